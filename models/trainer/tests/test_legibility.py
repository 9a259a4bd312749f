"""The legibility probe (``python -m rxvision_trainer legibility``): its arithmetic by hand, and the
whole command on the shipped bundle's own self-test crops."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rxvision_trainer.data import write_labels_csv
from rxvision_trainer.legibility import auc, match_score, passing_share
from rxvision_trainer.preprocess import find_repo_root

BUNDLE = find_repo_root() / "models" / "bundles" / "pillnet" / "0.6.0"


def test_the_match_score_is_the_expected_probability_only_on_top():
    probs = np.asarray([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.4, 0.4, 0.2]])
    got = match_score(probs, np.asarray([0, 2, 1]))
    assert got.tolist() == [0.7, 0.0, 0.0]  # row 2: a tie goes to the first class, as argmax does


def test_passing_share_lets_at_most_the_rate_of_impostors_through():
    impostors = np.asarray([0.99, 0.9, 0.5, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    genuine = np.asarray([0.999, 0.95, 0.9, 0.6, 0.5, 0.1])
    assert passing_share(genuine, impostors, 0.0) == (1 / 6, 0.99)   # none of 10 may pass
    assert passing_share(genuine, impostors, 0.1) == (2 / 6, 0.9)    # one may: 0.99 does
    assert passing_share(genuine, impostors, 0.25) == (4 / 6, 0.5)   # two may; the tie at 0.5 stays out
    assert passing_share(genuine, impostors, 0.5) == (1.0, 0.0)      # five may: all above the zeros
    with pytest.raises(ValueError):
        passing_share(genuine, impostors[:0], 0.01)


def test_auc_is_the_pairwise_share_with_ties_half():
    rng = np.random.default_rng(4)
    g = rng.integers(0, 6, 40).astype(float)
    i = rng.integers(0, 5, 30).astype(float)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in g for b in i])
    assert auc(g, i) == pytest.approx(brute)


def _crops(root: Path, imitate) -> None:
    """The bundle's self-test crops as genuine rows (every other one a blank face), and each again as an
    impostor of ``imitate(i, ndcs)``."""
    images = sorted((BUNDLE / "selftest").glob("c*_*.jpg"))
    assert len(images) >= 4, "the bundle has self-test crops"
    ndcs = [p.stem.split("_", 1)[1] for p in images]
    (root / "img").mkdir(parents=True)
    rows = []
    for i, (p, ndc) in enumerate(zip(images, ndcs)):
        shutil.copy(p, root / "img" / p.name)
        rows.append({"file": f"img/{p.name}", "ndc": ndc, "imprint": "M;30" if i % 2 == 0 else ""})
        rows.append({"file": f"img/{p.name}", "ndc": "99999-9999-99", "imitates": imitate(i, ndcs),
                     "imprint": "M;38"})
    write_labels_csv(root, rows)


def test_the_command_on_the_shipped_bundle(tmp_path, capsys):
    from rxvision_trainer.__main__ import main

    # impostors that imitate another product: the model names the crop's own, so none of them passes
    _crops(tmp_path / "apart", lambda i, ndcs: ndcs[(i + 1) % len(ndcs)])
    assert main(["legibility", str(BUNDLE), "--data", str(tmp_path / "apart"), "--json"]) == 0
    import json
    rows = {r["faces"]: r for r in json.loads(capsys.readouterr().out)}
    n = len(list((BUNDLE / "selftest").glob("c*_*.jpg")))
    assert rows["all faces"]["genuine"] == n and rows["text faces"]["genuine"] == (n + 1) // 2
    assert rows["all faces"]["impostors"] == n
    assert rows["all faces"]["passing"] == {"0.01": 1.0, "0.002": 1.0} and rows["all faces"]["auc"] == 1.0
    # impostors that are the very crops of the product they imitate: no threshold tells them apart
    _crops(tmp_path / "same", lambda i, ndcs: ndcs[i])
    assert main(["legibility", str(BUNDLE), "--data", str(tmp_path / "same"), "--json"]) == 0
    rows = {r["faces"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["all faces"]["passing"]["0.01"] == 0.0 and rows["all faces"]["auc"] == pytest.approx(0.5)


def test_bad_input_is_refused(tmp_path, capsys):
    from rxvision_trainer.__main__ import main

    _crops(tmp_path / "d", lambda i, ndcs: ndcs[i])
    with pytest.raises(SystemExit) as e:
        main(["legibility", str(BUNDLE), "--data", str(tmp_path / "d"), "--impostor-rates", "0.01,two"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["legibility", str(BUNDLE), "--data", str(tmp_path / "d"), "--impostor-rates", "1.5"])
    assert e.value.code == 2
    # no impostors: nothing to measure against
    lines = (tmp_path / "d" / "labels.csv").read_text().splitlines()
    (tmp_path / "d" / "labels.csv").write_text("\n".join(l for l in lines if "99999-9999-99" not in l) + "\n")
    capsys.readouterr()
    assert main(["legibility", str(BUNDLE), "--data", str(tmp_path / "d")]) == 65
    assert "render with --impostors" in capsys.readouterr().err
    assert main(["legibility", str(tmp_path), "--data", str(tmp_path / "d")]) == 65


def test_a_truncated_image_is_named_and_refused(tmp_path, capsys):
    from rxvision_trainer.__main__ import main

    _crops(tmp_path / "d", lambda i, ndcs: ndcs[(i + 1) % len(ndcs)])
    victim = sorted((tmp_path / "d" / "img").glob("*.jpg"))[1]
    victim.write_bytes(victim.read_bytes()[:100])
    capsys.readouterr()
    assert main(["legibility", str(BUNDLE), "--data", str(tmp_path / "d")]) == 65
    err = capsys.readouterr().err
    assert victim.name in err and "cannot read the image" in err
