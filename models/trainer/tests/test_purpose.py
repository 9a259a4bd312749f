"""``train --purpose fixture``, ``--max-rotation``/``--max-shift`` and ``card-append`` on a tiny drawn
dataset (CPU, a few seconds).

The production default is checked by the smoke test (``smoke.check_bundle``).
"""
from __future__ import annotations

import json

import pytest

from rxvision_trainer.__main__ import main as cli
from rxvision_trainer.bundle import verify_bundle
from rxvision_trainer.data import Formulary
from rxvision_trainer.smoke import make_dataset


@pytest.fixture(scope="module")
def fixture_bundle(tmp_path_factory):
    fpath = Formulary.default_path()
    if fpath is None:
        pytest.skip("not inside an RxVision checkout (needs models/formulary/formulary.json)")
    work = tmp_path_factory.mktemp("purpose")
    _, holdout = make_dataset(work / "data", Formulary(fpath), per_class=16, per_holdout=8)
    bundle = work / "bundle"
    rc = cli(["-q", "train", "--data", str(work / "data"), "--out", str(bundle), "--version", "0.1.0",
              "--epochs", "4", "--seed", "1", "--device", "cpu", "--size", "64", "--widths", "8,16,32,32",
              "--batch-size", "8", "--lr", "3e-3", "--warmup-epochs", "0.25", "--val-fraction", "0.25",
              "--calib-images", "32", "--max-rotation", "0", "--max-shift", "0", "--holdout-ndc", holdout,
              "--name", "fixture-test", "--purpose", "fixture",
              "--created", "2026-01-01T00:00:00Z", "--no-mlflow", "--data-note", "Drawn shapes, not pills."])
    assert rc == 0
    return bundle


def test_fixture_purpose_is_in_the_manifest_and_the_card(fixture_bundle):
    m = json.loads((fixture_bundle / "manifest.json").read_text())
    assert m["purpose"] == "fixture" and m["name"] == "fixture-test"
    assert "TEST FIXTURE" in m["description"]
    card = (fixture_bundle / "MODEL_CARD.md").read_text()
    assert card.splitlines()[2].startswith("**This is a test fixture (`purpose: fixture`), not a pill model.**")
    assert "Drawn shapes, not pills." in card
    assert "rotation +-0 deg" in card and "shift +-0%" in card  # the augmentation options reach the run
    assert verify_bundle(fixture_bundle)["cases"] >= 1


def test_card_append_rehashes_and_keeps_the_rest(fixture_bundle, tmp_path, capsys):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(fixture_bundle, b)
    before = json.loads((b / "manifest.json").read_text())
    card_before = (b / "MODEL_CARD.md").read_text()
    section = tmp_path / "eval.md"
    section.write_text("\n## Counter evaluation\n\ntop-1 1.0 on 3 frames\n\n")
    assert cli(["-q", "card-append", str(b), "--section", str(section)]) == 0
    after = json.loads((b / "manifest.json").read_text())
    card = (b / "MODEL_CARD.md").read_text()
    assert card == card_before.rstrip("\n") + "\n\n## Counter evaluation\n\ntop-1 1.0 on 3 frames\n"
    assert {k: v for k, v in after.items() if k != "files"} == {k: v for k, v in before.items() if k != "files"}
    changed = {k for k in before["files"] if before["files"][k] != after["files"][k]}
    assert changed == {"MODEL_CARD.md"} and list(after) == list(before)
    assert verify_bundle(b)["cases"] >= 1

    # a bundle that does not verify is not amended (its card is left alone)
    (b / "labels.json").write_text((b / "labels.json").read_text() + " ")
    assert cli(["-q", "card-append", str(b), "--section", str(section)]) == 65
    assert "not a valid bundle, left unchanged: labels.json" in capsys.readouterr().err
    assert (b / "MODEL_CARD.md").read_text() == card
    # a folder that is no bundle at all, and a section that cannot be read: named, exit 65
    (tmp_path / "empty").mkdir()
    assert cli(["-q", "card-append", str(tmp_path / "empty"), "--section", str(section)]) == 65
    assert "not a valid bundle, left unchanged" in capsys.readouterr().err
    assert cli(["-q", "card-append", str(b), "--section", str(tmp_path / "missing.md")]) == 65
    assert "missing.md: cannot read the section" in capsys.readouterr().err
