"""End-to-end smoke test of the trainer (also: ``python -m rxvision_trainer.smoke``).

Tiny Pillow-drawn dataset, 1 epoch on the CPU, a bundle in a temp dir; the
bundle's hashes are recomputed, the int8 model is run in ONNX Runtime against
selftest/expected.json, and tampering is caught by ``verify_bundle``.
Under 2 minutes on 2 cores (about 25 s measured).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rxvision_trainer.bundle import BundleCheckError, verify_bundle
from rxvision_trainer.smoke import run_smoke


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    return work, run_smoke(work, device="cpu")


def test_smoke_bundle_is_consistent_and_matches_ort(smoke):
    work, res = smoke
    assert res["cases"] >= 1
    assert res["max_abs_diff"] <= res["tolerance"]
    assert res["num_classes"] == 6
    assert res["preprocess_matches_reference"], "run inside the checkout: the reference preprocessing must be compared"
    assert res["seconds"] < 120
    m = res["metrics"]
    for key in ("val_top1_f32", "val_top3_f32", "val_top1_int8", "val_top3_int8", "ece_f32_uncalibrated",
                "ece_f32_calibrated", "model_bytes_f32", "model_bytes_int8", "macs", "params", "open_set",
                "per_group_top1_int8", "thresholds"):
        assert key in m, key
    assert m["open_set"]["n_select"] == 8 and m["open_set"]["holdout_ndcs"] == [res["holdout"]]
    assert m["model_bytes_int8"] < 0.3 * m["model_bytes_f32"]
    card = (work / "bundle" / "MODEL_CARD.md").read_text()
    assert "synthetic" in card.lower() and "unmeasured" in card


def test_tampering_is_caught(smoke, tmp_path):
    work, _ = smoke
    src = work / "bundle"

    def copy() -> Path:
        dst = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src, dst)
        return dst

    assert verify_bundle(copy())["cases"] >= 1
    b = copy()
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleCheckError, match="model.onnx"):
        verify_bundle(b)
    b = copy()
    (b / "extra.txt").write_text("x")
    with pytest.raises(BundleCheckError, match="unlisted"):
        verify_bundle(b)
    b = copy()
    m = json.loads((b / "manifest.json").read_text())
    m["description"] += "!"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleCheckError, match="manifest.json.sha256"):
        verify_bundle(b)


def test_the_crop_is_part_of_the_input_contract(smoke, tmp_path):
    """``input.crop`` may say how the counter cuts the pill (upright); anything else is refused."""
    import hashlib
    work, _ = smoke
    for crop, ok in (("upright", True), ("square", True), ("diagonal", False)):
        b = tmp_path / crop
        shutil.copytree(work / "bundle", b)
        m = json.loads((b / "manifest.json").read_text())
        m["input"]["crop"] = crop
        (b / "manifest.json").write_text(json.dumps(m))
        digest = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
        (b / "manifest.json.sha256").write_text(f"{digest}  manifest.json\n")
        if ok:
            assert verify_bundle(b)["cases"] >= 1
        else:
            with pytest.raises(BundleCheckError, match="input spec"):
                verify_bundle(b)
