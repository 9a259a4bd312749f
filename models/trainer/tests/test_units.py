"""Unit tests: reference preprocessing copy, calibration, thresholds, splits, profile, mlflow hook."""
from __future__ import annotations

import json
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rxvision_trainer import calibrate
from rxvision_trainer.data import Sample, build_classes, normalise_ndc, read_dataset, split_train_val, write_labels_csv
from rxvision_trainer.preprocess import MEAN, SCALE, STD, load_reference_module, preprocess, preprocess_pil


def _noise_image(path: Path, size=(203, 157), seed=0, fmt="PNG"):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def test_preprocess_copy_matches_reference(tmp_path):
    ref = load_reference_module()
    if ref is None:
        pytest.skip("not inside an RxVision checkout")
    for i, (size, fmt) in enumerate([((203, 157), "PNG"), ((64, 300), "PNG"), ((150, 150), "JPEG")]):
        p = _noise_image(tmp_path / f"{i}.{fmt.lower()}", size, i, fmt)
        for w, h in ((128, 128), (224, 96)):
            a = preprocess(str(p), w, h, SCALE, MEAN, STD)
            b = ref.preprocess(str(p), w, h, SCALE, MEAN, STD)
            assert a.dtype == np.float32 and a.shape == (1, 3, h, w)
            assert np.array_equal(a, b)
        with Image.open(p) as im:
            rgba = im.convert("RGBA")
            assert np.array_equal(preprocess_pil(rgba, 128, 128, SCALE, MEAN, STD),
                                  ref.preprocess_pil(rgba, 128, 128, SCALE, MEAN, STD))


def test_temperature_recovers_a_known_scale():
    rng = np.random.default_rng(0)
    n, c = 4000, 5
    true_logits = rng.normal(0, 2.0, size=(n, c))
    p = calibrate.softmax(true_logits)
    labels = np.array([rng.choice(c, p=row) for row in p])
    t = calibrate.fit_temperature(true_logits * 3.0, labels)  # overconfident by 3x
    assert 2.6 < t < 3.4
    ece_before = calibrate.ece(calibrate.softmax(true_logits * 3.0), labels)
    ece_after = calibrate.ece(calibrate.softmax(true_logits * 3.0 / t), labels)
    assert ece_after < ece_before and ece_after < 0.03


def test_ece_and_topk():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 1])
    # bins: 0.9 -> right; 0.6 -> wrong; 0.8 -> right
    assert calibrate.ece(probs, labels) == pytest.approx((0.1 + 0.6 + 0.2) / 3)
    assert calibrate.topk_accuracy(probs, labels, 1) == pytest.approx(2 / 3)
    assert calibrate.topk_accuracy(probs, labels, 2) == 1.0


def test_thresholds_reach_the_open_set_target():
    rng = np.random.default_rng(1)
    n, c = 500, 10
    labels = rng.integers(0, c, n)
    probs_in = np.full((n, c), 0.02 / (c - 1))
    probs_in[np.arange(n), labels] = 0.98
    unk = rng.dirichlet(np.ones(c) * 0.7, size=200)
    ch = calibrate.choose_thresholds(probs_in, labels, unk, target=0.9)
    assert ch.target_met and ch.open_set_uncertain_rate >= 0.9
    assert ch.in_formulary_uncertain_rate == 0.0 and ch.in_formulary_accepted_accuracy == 1.0
    mask = calibrate.uncertain_mask(unk, ch.min_confidence, ch.min_margin)
    assert mask.mean() == pytest.approx(ch.open_set_uncertain_rate)
    d = calibrate.choose_thresholds(probs_in, labels, None, default=(0.6, 0.2))
    assert (d.min_confidence, d.min_margin, d.target_met) == (0.6, 0.2, None)


def test_split_is_stratified_deterministic_and_keeps_pills_together(tmp_path):
    samples = [Sample(tmp_path / f"{n}{i}", f"{n}/{i}.png", n, face=f, seed=f"{n}-{i // 2}")
               for n in ("a", "b") for i in range(20) for f in ("front",)]
    tr, va = split_train_val(samples, 0.2, 3)
    tr2, va2 = split_train_val(samples, 0.2, 3)
    assert [s.file for s in va] == [s.file for s in va2]
    assert {s.ndc for s in va} == {"a", "b"} and len(tr) + len(va) == 40
    assert not ({s.seed for s in tr} & {s.seed for s in va})


def test_dataset_classes_follow_the_formulary(tmp_path):
    from rxvision_trainer.data import Formulary

    fpath = Formulary.default_path()
    if fpath is None:
        pytest.skip("no formulary in this checkout")
    f = Formulary(fpath)
    a, b, held = f.products[3]["ndc"], f.products[0]["ndc"], f.products[1]["ndc"]
    rows = []
    for ndc in (a, b, held, "99999-0000-00"):
        for i in range(2):
            rel = f"images/{ndc}/{i}.png"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            _noise_image(tmp_path / rel, (32, 32), i)
            rows.append({"file": rel, "ndc": ndc, "name": "Unknown product" if ndc.startswith("9") else ""})
    write_labels_csv(tmp_path, rows)
    data = read_dataset(tmp_path)
    classes = build_classes(data, f, holdout={held})
    # formulary order first, then products the formulary does not know (labels from labels.csv)
    assert [c.ndc for c in classes] == [b, a, "99999-0000-00"]
    assert [c.index for c in classes] == [0, 1, 2]
    assert classes[0].attributes == f.by_ndc[b] and classes[2].name == "Unknown product"
    assert normalise_ndc("59762371901") == "59762-3719-01"
    # impostors (rxvision-synth dataset --impostors) are outliers, never classes
    rel = "images/impostor.png"
    _noise_image(tmp_path / rel, (32, 32), 9)
    rows.append({"file": rel, "ndc": "99999-0001-01", "imitates": a})
    write_labels_csv(tmp_path, rows)
    data = read_dataset(tmp_path)
    assert [s.imitates for s in data if s.ndc == "99999-0001-01"] == [a]
    assert [c.ndc for c in build_classes(data, f, holdout={held})] == [b, a, "99999-0000-00"]


def test_profile_reads_the_feature_csv(tmp_path):
    from rxvision_trainer.profile import build_profile

    fake = tmp_path / "rxvision-synth"
    fake.write_text("#!/bin/sh\n[ \"$1\" = features ] || exit 2\necho file,aspect_ratio,mean_r,blur\n"
                    "for f in $(tail -n +2 \"$2/labels.csv\" | cut -d, -f1); do echo $f,1.5,120.0,3.25; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    imgs = []
    for i in range(3):
        p = _noise_image(tmp_path / f"{i}.png", (40, 30), i)
        imgs.append(Sample(p, p.name, "n1"))
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.55, 0.45]])
    prof = build_profile(imgs, probs, None, str(fake), "test")
    assert prof["features"]["available"]
    assert set(prof["features"]["columns"]) == {"aspect_ratio", "mean_r", "blur"}
    assert prof["features"]["columns"]["mean_r"]["n"] == 3
    assert prof["confidence"]["top1"]["histogram"]["counts"][-3:] != [0, 0, 0]
    json.dumps(prof, allow_nan=False)
    none = build_profile(imgs, probs, None, None, "test")
    assert not none["features"]["available"] and "NOT profiled" in none["features"]["note"]


def test_mlflow_is_used_when_importable(tmp_path, monkeypatch):
    from argparse import Namespace
    from rxvision_trainer.pipeline import log_mlflow

    calls = []
    fake = types.ModuleType("mlflow")

    class Run:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    fake.start_run = lambda **k: (calls.append(("start", k)), Run())[1]
    fake.log_params = lambda p: calls.append(("params", p))
    fake.log_metrics = lambda m: calls.append(("metrics", m))
    fake.log_artifacts = lambda d, artifact_path=None: calls.append(("artifacts", artifact_path))
    fake.get_tracking_uri = lambda: "file:///dev/null"
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    args = Namespace(name="pillnet", version="1.0.0", epochs=1, artifacts=None, argv=["x"])
    log_mlflow(args, {"val_top1_int8": 0.5, "open_set": {"uncertain_rate": 0.9, "target_met": True}}, tmp_path)
    kinds = [c[0] for c in calls]
    assert kinds == ["start", "params", "metrics", "artifacts"]
    assert calls[2][1] == {"val_top1_int8": 0.5, "open_set.uncertain_rate": 0.9}


def test_convert_an_image_index(tmp_path):
    from rxvision_trainer.data import Formulary, convert_index

    fpath = Formulary.default_path()
    if fpath is None:
        pytest.skip("no formulary in this checkout")
    f = Formulary(fpath)
    prod = f.products[0]
    other_package = prod["ndc"].replace("-", "")[:9] + "99"  # same labeler-product, another package
    src = tmp_path / "c3pi" / "disc1"
    src.mkdir(parents=True)
    _noise_image(src / "A.JPG", (50, 40), 1, "JPEG")
    _noise_image(src / "B.PNG", (50, 40), 2)
    (tmp_path / "index.tsv").write_text(
        "NDC11\tFile\tLayout\n"
        f"{other_package}\tA.JPG\tC3PI_Test\n"
        "12345678901\tB.PNG\tC3PI_Test\n"
        "12345678901\tmissing.png\tC3PI_Test\n"
        f"{other_package}\tB.PNG\tMC_REFERENCE\n")
    n = convert_index(tmp_path / "index.tsv", tmp_path / "c3pi", tmp_path / "ds", file_col="File", ndc_col="NDC11",
                      filter_col="Layout", filter_values=["C3PI_Test"], formulary=f)
    assert n == 2
    ds = read_dataset(tmp_path / "ds")
    assert [(s.ndc, s.name) for s in ds] == [(prod["ndc"], prod["name"]), ("12345-6789-01", "")]


def test_camera_changes_are_what_they_say(tmp_path):
    from rxvision_trainer.camera_changes import CHANGES, SCALES, apply, write

    rng = np.random.default_rng(3)
    frame = Image.fromarray(rng.integers(60, 200, (48, 64, 3), dtype=np.uint8))
    grey = np.asarray(frame, np.float32)
    for change in CHANGES:
        out, quality = apply(change, frame)
        a = np.asarray(out, np.float32)
        if change in SCALES:
            assert out.size == (round(64 * SCALES[change]), round(48 * SCALES[change]))
            continue
        assert out.size == frame.size and 1 <= quality <= 95, change
        if change == "gamma-0.6":
            assert (a >= grey - 0.5).all() and a.mean() > grey.mean() + 10  # brighter mid-tones
        elif change == "gamma-1.6":
            assert (a <= grey + 0.5).all() and a.mean() < grey.mean() - 10
        elif change == "warm":
            assert a[..., 0].mean() > grey[..., 0].mean() + 10 and a[..., 2].mean() < grey[..., 2].mean() - 10
        elif change == "cool":
            assert a[..., 2].mean() > grey[..., 2].mean() + 10 and a[..., 0].mean() < grey[..., 0].mean() - 10
        elif change == "jpeg-25":
            assert quality == 25 and (a == grey).all()
        elif change == "blur-1.5":
            assert a.std() < grey.std() * 0.8
        elif change == "rotate-12":
            assert not (a == grey).all()
    with pytest.raises(ValueError):
        apply("sepia", frame)
    # a dataset in, the same labels out, every image changed
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    frame.save(src / "images" / "a.jpg", quality=95)
    write_labels_csv(src, [{"file": "images/a.jpg", "ndc": "00000-0000-01"}])
    assert write(src, tmp_path / "out", "scale-0.75") == 1
    assert (tmp_path / "out" / "labels.csv").read_text() == (src / "labels.csv").read_text()
    assert Image.open(tmp_path / "out" / "images" / "a.jpg").size == (48, 36)


def test_the_away_loss_penalises_only_the_imitated_class_and_uniform_stays_as_it_was():
    import torch

    from rxvision_trainer.train import outlier_loss

    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    imitated = torch.tensor([0, 2, -1])
    # uniform: the cross-entropy to the uniform distribution, whatever the labels (the old loss exactly)
    old = -torch.log_softmax(logits, dim=1).mean()
    assert torch.equal(outlier_loss(logits, imitated, "uniform"), old)
    assert torch.equal(outlier_loss(logits, None, "away"), old)
    # away: -log(1 - p(imitated)) for impostors, the uniform loss for the rest
    p = torch.softmax(logits, dim=1)
    want = torch.stack([-torch.log(1 - p[0, 0]), -torch.log(1 - p[1, 2]),
                        -torch.log_softmax(logits[2], dim=0).mean()]).mean()
    got = outlier_loss(logits, imitated, "away")
    assert torch.allclose(got, want, atol=1e-6)
    got.backward()
    g = logits.grad
    # descending the gradient lowers the imitated class's logit relative to every other
    assert g[0, 0] > 0 and (g[0, 1:] < 0).all()
    assert g[1, 2] > 0 and g[1, 1] < 0, "the top class that is not the imitated one is not pushed down"
    # a confident impostor costs far more than a doubtful one
    sure = outlier_loss(torch.tensor([[12.0, 0.0]]), torch.tensor([0]), "away")
    doubtful = outlier_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([0]), "away")
    assert sure > 10 * doubtful and torch.isfinite(sure)
    with pytest.raises(ValueError, match="uniform, away"):
        outlier_loss(logits, imitated, "sideways")


def test_the_bag_of_imprint_characters():
    """Counts per character, 3 and more in one bin, separators and unknown characters not counted."""
    from rxvision_trainer.imprint import ALPHABET, COUNT_BINS, UNKNOWN, bag, bags

    b = bag("G;3719")
    assert b.shape == (len(ALPHABET),) and b.sum() == 5
    assert [int(b[ALPHABET.index(c)]) for c in "G3719"] == [1] * 5
    assert bag("1000")[ALPHABET.index("0")] == 3 and bag("00000")[ALPHABET.index("0")] == COUNT_BINS - 1
    assert bag("a-b/ c").sum() == 3 and bag("").sum() == 0
    assert (bag("M;366") == bag("366;M")).all(), "no reading order: a turned or two-line imprint is the same bag"
    # one character changed to another of its kind always changes the bag (an impostor is never its original)
    assert (bag("M365") != bag("M366")).sum() == 2 and (bag("M366") != bag("M636")).sum() == 0
    rows = bags(["AB", None, ""])
    assert (rows[1] == UNKNOWN).all() and rows[0].sum() == 2 and rows[2].sum() == 0


def test_the_imprint_loss_ignores_unknown_rows_and_the_likelihood_reads_the_bag():
    import torch
    from rxvision_trainer.imprint import ALPHABET, COUNT_BINS, UNKNOWN, bag, bag_log_likelihood, imprint_loss

    a = len(ALPHABET)
    target = torch.from_numpy(np.stack([bag("AB1"), np.full(a, UNKNOWN)]))
    perfect = torch.full((2, a, COUNT_BINS), -20.0)
    perfect[0].scatter_(1, target[0].view(-1, 1), 20.0)
    assert float(imprint_loss(perfect, target)) < 1e-6, "the unknown row costs nothing"
    assert float(imprint_loss(torch.zeros(2, a, COUNT_BINS), target)) == pytest.approx(np.log(COUNT_BINS))
    assert float(imprint_loss(torch.zeros(1, a, COUNT_BINS), target[1:])) == 0.0
    logp = torch.log_softmax(perfect[:1], dim=2).numpy()
    right = bag_log_likelihood(logp, bag("AB1")[None])[0]
    wrong = bag_log_likelihood(logp, bag("AB2")[None])[0]
    assert right > -1e-6 and wrong < -70, (right, wrong)


@pytest.mark.parametrize("hidden", [0, 16])
def test_an_imprint_head_starts_from_a_checkpoint_without_one(tmp_path, hidden):
    """--init-from a model without the imprint head: the shared weights load, the head keeps its own."""
    import torch
    from rxvision_trainer.model import ArchConfig, PillNet
    from rxvision_trainer.train import CHECKPOINT_FORMAT, load_initial_weights

    torch.manual_seed(1)
    plain = PillNet(3, ArchConfig((8, 8), (0, 0)))
    path = tmp_path / "plain.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "identity": {"classes": ["a", "b", "c"]}, "model": plain.state_dict()},
               path)
    reader = PillNet(3, ArchConfig((8, 8), (0, 0), imprint_outputs=(62, 4), imprint_hidden=hidden))
    head = {k: v.clone() for k, v in reader.state_dict().items() if k.startswith(("imprint_head.", "imprint_hidden."))}
    assert len(head) == (4 if hidden else 2)
    load_initial_weights(path, reader, ["a", "b", "c"])
    for k, v in reader.state_dict().items():
        assert torch.equal(v, head[k] if k in head else plain.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    reader.eval(), plain.eval()
    logits, read = reader.forward_both(x)
    assert torch.equal(logits, plain(x)) and read.shape == (2, 62, 4)
    assert plain.forward_both(x)[1] is None


def test_a_stem_reads_the_input_at_full_resolution_and_folds_like_the_rest():
    """--stem W: a stride-1 conv-BN-ReLU before the first stage; BatchNorm folding keeps the logits."""
    import torch
    from rxvision_trainer.model import ArchConfig, PillNet, count_cost, fuse, fused_forward

    torch.manual_seed(2)
    plain, stemmed = PillNet(3, ArchConfig((8, 16), (0, 1))), PillNet(3, ArchConfig((8, 16), (0, 1), stem=4))
    first = stemmed.features[0][0]
    assert (first.in_channels, first.out_channels, first.stride) == (3, 4, (1, 1))
    assert stemmed.features[1][0].in_channels == 4 and len(stemmed.features) == len(plain.features) + 1
    # the stem's cost: a 3x3 conv 3->4 at 32x32, and the first stage now reads 4 channels instead of 3
    assert count_cost(stemmed, 32).macs - count_cost(plain, 32).macs == 32 * 32 * 27 * 4 + 16 * 16 * 9 * 8
    assert "stride-1 4-channel stem" in stemmed.arch.describe()
    stemmed.train()
    for _ in range(3):  # running statistics away from their initial values
        stemmed(torch.randn(4, 3, 32, 32))
    stemmed.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(fused_forward(fuse(stemmed), x), stemmed(x), atol=1e-4)
