"""Training across sessions (``train.Resumable``, ``--checkpoint`` / ``--pause-at``).

The promise: a run paused after any epoch and resumed in a new process is the
same run as one without pauses. On the CPU that is checked bit for bit: same
weights, same per-epoch losses. A checkpoint of another run (other recipe,
other classes, other image bytes) or a damaged file is refused and left as it
was.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rxvision_trainer.data import read_dataset, write_labels_csv
from rxvision_trainer.model import ArchConfig, PillNet
from rxvision_trainer.smoke import draw
from rxvision_trainer.tensordata import TensorAugment, TensorEvalSet, TensorTrainSource, load_decoded
from rxvision_trainer.train import CheckpointError, Resumable, TrainConfig, train

CLASSES = 3
CFG = TrainConfig(epochs=3, batch_size=4, workers=0, seed=2, lr=3e-3)
DEV = torch.device("cpu")


def _dataset(root: Path, per_class: int = 6) -> list:
    rows = []
    for c in range(CLASSES):
        for i in range(per_class):
            rel = f"images/c{c}/{i:02d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            draw(c, np.random.default_rng([9, c, i])).resize((64, 64)).save(root / rel)
            rows.append({"file": rel, "ndc": f"0000{c}-0000-00"})
    write_labels_csv(root, rows)
    return read_dataset(root)


def _tiny_train_args(data: Path) -> list[str]:
    """``python -m rxvision_trainer`` arguments of a tiny CPU run on ``data`` (output, version and epochs to add)."""
    return ["-q", "train", "--data", str(data), "--seed", "3", "--size", "32", "--device", "cpu",
            "--widths", "16,16,32,32", "--depths", "0,0,0,0", "--batch-size", "4", "--lr", "3e-3",
            "--warmup-epochs", "0.25", "--val-fraction", "0.25", "--calib-images", "16", "--purpose", "fixture",
            "--no-mlflow"]


def _session(root: Path, samples, resumable: Resumable | None) -> tuple[PillNet, list]:
    """One process's worth of training: a fresh model and source, as a new session would build them."""
    torch.manual_seed(CFG.seed)
    model = PillNet(CLASSES, ArchConfig((8, 8, 8, 8), (0, 0, 0, 0)))
    class_of = {f"0000{c}-0000-00": c for c in range(CLASSES)}
    dec = load_decoded(root, samples, 32, workers=1, cache=False)
    src = TensorTrainSource(dec, samples, class_of, TensorAugment(), CFG.seed, CFG.batch_size, DEV, outlier_batch=1)
    hist = train(model, src, CFG, DEV, val_ds=TensorEvalSet(dec, samples, class_of, DEV), resumable=resumable)
    return model, hist


def _losses(hist) -> list:
    return [(h["epoch"], h["loss"], h["train_top1"], h["val_top1"]) for h in hist]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    samples = _dataset(root)
    model, hist = _session(root, samples, None)
    return root, samples, model, hist


def test_a_run_paused_after_every_epoch_is_the_run_without_pauses(straight, tmp_path):
    root, samples, model, hist = straight
    ckpt = tmp_path / "run.pt"
    sessions = []
    while True:
        # a deadline already past: each session trains exactly one epoch and pauses
        _m, h = _session(root, samples, Resumable(ckpt, {"run": "a"}, pause_at=time.time()))
        sessions.append(len(h))
        if len(h) == CFG.epochs:
            break
        assert len(sessions) < 10, "no progress across sessions"
    assert sessions == [1, 2, 3]
    assert _losses(h) == _losses(hist)
    for k, v in model.state_dict().items():
        assert torch.equal(v, _m.state_dict()[k]), k
    # the checkpoint of a finished run resumes to nothing more
    _m2, h2 = _session(root, samples, Resumable(ckpt, {"run": "a"}))
    assert _losses(h2) == _losses(hist)


def test_no_deadline_trains_to_the_end_and_keeps_the_state(straight, tmp_path):
    root, samples, model, hist = straight
    ckpt = tmp_path / "run.pt"
    m, h = _session(root, samples, Resumable(ckpt, {"run": "a"}))
    assert _losses(h) == _losses(hist)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == CFG.epochs and state["identity"] == {"run": "a"}


def test_another_runs_checkpoint_or_a_damaged_one_is_refused_and_left_alone(straight, tmp_path):
    root, samples, _model, _hist = straight
    ckpt = tmp_path / "run.pt"
    _session(root, samples, Resumable(ckpt, {"run": "a", "lr": 0.003}, pause_at=time.time()))
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0\.003, this run 0\.001"):
        _session(root, samples, Resumable(ckpt, {"run": "a", "lr": 0.001}))
    assert ckpt.read_bytes() == before

    ckpt.write_bytes(before[: len(before) // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="unreadable"):
        _session(root, samples, Resumable(ckpt, {"run": "a", "lr": 0.003}))
    assert ckpt.read_bytes() == before[: len(before) // 2]


def test_the_identity_sees_the_image_bytes(tmp_path):
    from rxvision_trainer.pipeline import content_fingerprint

    samples = _dataset(tmp_path)
    a = content_fingerprint(tmp_path, samples)
    assert content_fingerprint(tmp_path, samples) == a
    img = samples[4].path
    img.write_bytes(img.read_bytes()[:-1] + bytes([img.read_bytes()[-1] ^ 1]))  # one bit of one image
    assert content_fingerprint(tmp_path, samples) != a


def test_the_command_line_pauses_with_75_and_goes_on(tmp_path):
    """``python -m rxvision_trainer train --checkpoint --pause-at`` end to end on a tiny dataset."""
    from rxvision_trainer.__main__ import main

    data = tmp_path / "data"
    _dataset(data, per_class=16)
    args = ["-q", "train", "--data", str(data), "--out", str(tmp_path / "bundle"), "--version", "0.0.1",
            "--epochs", "2", "--seed", "3", "--size", "32", "--device", "cpu", "--widths", "16,16,32,32",
            "--depths", "0,0,0,0", "--batch-size", "4", "--lr", "3e-3", "--warmup-epochs", "0.25",
            "--val-fraction", "0.25", "--calib-images", "16",
            "--purpose", "fixture", "--no-mlflow", "--checkpoint", str(tmp_path / "run.pt")]
    assert main(args + ["--pause-at", "2000-01-01T00:00Z"]) == 75
    assert not (tmp_path / "bundle").exists()
    assert torch.load(tmp_path / "run.pt", weights_only=True)["epoch"] == 1
    assert main(args + ["--pause-at", "2000-01-01T00:00Z"]) == 0  # the second epoch is the last
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    # the same checkpoint under another recipe: a clear refusal (65), no bundle change
    assert main([a if a != "0.0.1" else "0.0.2" for a in args[:-2]] + ["--lr", "0.01", "--checkpoint",
                                                                       str(tmp_path / "run.pt")]) == 65


def test_a_deadline_without_a_zone_or_a_checkpoint_is_bad_usage(tmp_path):
    from rxvision_trainer.__main__ import main

    base = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--version", "0.0.1", "--epochs", "1",
            "--seed", "1"]
    with pytest.raises(SystemExit) as e:
        main(base + ["--checkpoint", str(tmp_path / "c.pt"), "--pause-at", "2026-11-28T06:30"])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="--pause-at needs --checkpoint"):
        _dataset(tmp_path)
        main(base + ["--pause-at", "2026-11-28T06:30Z"])


def test_init_from_starts_from_another_runs_weights_and_refuses_other_classes(tmp_path):
    """``train --init-from``: a finished run's weights, a fresh schedule; other classes are refused (65)."""
    from rxvision_trainer.__main__ import main
    from rxvision_trainer.train import load_initial_weights

    data = tmp_path / "data"
    _dataset(data, per_class=16)
    common = _tiny_train_args(data)
    first = tmp_path / "first.pt"
    assert main(common + ["--out", str(tmp_path / "b1"), "--version", "0.0.1", "--epochs", "1",
                          "--checkpoint", str(first)]) == 0
    second = tmp_path / "second.pt"
    assert main(common + ["--out", str(tmp_path / "b2"), "--version", "0.0.2", "--epochs", "1",
                          "--init-from", str(first), "--impostor-loss", "away", "--jpeg-quality", "20",
                          "--checkpoint", str(second)]) == 0
    a, b = torch.load(first, weights_only=True), torch.load(second, weights_only=True)
    assert b["identity"]["init_from"] and b["identity"]["impostor_loss"] == "away"
    assert b["identity"]["jpeg_quality"] == 20
    assert "init_from" not in a["identity"] and "jpeg_quality" not in a["identity"], \
        "a run without them keeps the identity it had"
    assert "JPEG re-encoding p=0.5 at quality 20-95" in (tmp_path / "b2" / "MODEL_CARD.md").read_text()
    # the second run's first step starts from the first run's end, not from random weights
    model = PillNet(CLASSES, ArchConfig((16, 16, 32, 32), (0, 0, 0, 0)))
    load_initial_weights(first, model, [f"0000{c}-0000-00" for c in range(CLASSES)])
    for k, v in model.state_dict().items():
        assert torch.equal(v, a["model"][k]), k
    # a run of other classes (one more) or another architecture is refused, and nothing is loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="other classes"):
        load_initial_weights(first, model, [f"0000{c}-0000-00" for c in range(CLASSES + 1)])
    with pytest.raises(CheckpointError, match="another architecture"):
        load_initial_weights(first, PillNet(CLASSES, ArchConfig((8, 8, 8, 8), (0, 0, 0, 0))),
                             [f"0000{c}-0000-00" for c in range(CLASSES)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    more = tmp_path / "more"
    _dataset(more, per_class=16)
    extra = more / "images" / "c9" / "00.png"
    extra.parent.mkdir(parents=True)
    draw(0, np.random.default_rng(1)).resize((64, 64)).save(extra)
    rows = [{"file": s.file, "ndc": s.ndc} for s in read_dataset(more)] + \
        [{"file": "images/c9/00.png", "ndc": "00009-0000-00"}]
    write_labels_csv(more, rows)
    assert main([a if a != str(data) else str(more) for a in common] + [
        "--out", str(tmp_path / "b3"), "--version", "0.0.3", "--epochs", "1", "--init-from", str(first)]) == 65
    assert not (tmp_path / "b3").exists()
    assert main(common + ["--out", str(tmp_path / "b4"), "--version", "0.0.4", "--epochs", "1",
                          "--init-from", str(tmp_path / "missing.pt")]) == 65
    assert not (tmp_path / "b4").exists()


def test_imprint_weight_trains_a_reading_head_and_needs_the_imprints(tmp_path):
    """``train --imprint-weight``: the head learns the data's bags; data without the column is refused (65)."""
    from rxvision_trainer.__main__ import main
    from rxvision_trainer.imprint import ALPHABET

    data = tmp_path / "data"
    samples = _dataset(data, per_class=16)
    common = _tiny_train_args(data) + ["--version", "0.0.1", "--epochs", "2", "--imprint-weight", "1"]
    assert main(common + ["--out", str(tmp_path / "b0")]) == 65, "no imprint column: refused"
    assert not (tmp_path / "b0").exists()
    imprints = ["X1", "Y22", ""]  # class c's imprint; class 2 a blank face
    write_labels_csv(data, [{"file": s.file, "ndc": s.ndc, "imprint": imprints[int(s.ndc[4])]} for s in samples])
    assert read_dataset(data)[0].imprint == "X1"
    state = tmp_path / "state.pt"
    assert main(common + ["--out", str(tmp_path / "b1"), "--checkpoint", str(state)]) == 0
    saved = torch.load(state, weights_only=True)
    assert saved["identity"]["imprint_weight"] == 1.0
    assert saved["model"]["imprint_head.weight"].shape == (len(ALPHABET) * 4, 32)
    losses = [h["imprint_loss"] for h in saved["history"]]
    assert losses[1] < losses[0] < np.log(4), losses
    # the bundle is what it was: the exported graph has the class output only
    assert (tmp_path / "b1" / "model.onnx").is_file()
