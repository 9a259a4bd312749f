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
    """``input.crop`` may say how the counter cuts the pill (upright), and an upright crop its margin
    (``input.crop_margin``, 0..=1); anything else is refused, as the Rust loader refuses it."""
    import hashlib
    work, _ = smoke
    cases = ((("upright", None), None), (("square", None), None), (("diagonal", None), "input spec"),
             (("upright", 0.1), None), (("upright", 1.5), "must lie in 0..=1"),
             (("square", 0.1), "only to an upright crop"), (("upright", "0.1"), "must lie in 0..=1"))
    for i, ((crop, margin), refusal) in enumerate(cases):
        b = tmp_path / f"{i}-{crop}"
        shutil.copytree(work / "bundle", b)
        m = json.loads((b / "manifest.json").read_text())
        m["input"]["crop"] = crop
        if margin is not None:
            m["input"]["crop_margin"] = margin
        (b / "manifest.json").write_text(json.dumps(m))
        digest = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
        (b / "manifest.json.sha256").write_text(f"{digest}  manifest.json\n")
        if refusal is None:
            assert verify_bundle(b)["cases"] >= 1
        else:
            with pytest.raises(BundleCheckError, match=refusal):
                verify_bundle(b)


def test_an_input_spec_carries_the_margin_only_of_an_upright_crop():
    from rxvision_trainer.bundle import input_spec
    assert "crop_margin" not in input_spec(128, "upright")
    assert input_spec(128, "upright", 0.1)["crop_margin"] == 0.1
    for crop, margin in (("square", 0.1), ("upright", -0.1), ("upright", 2.0)):
        with pytest.raises(ValueError):
            input_spec(128, crop, margin)


def test_calibrate_match_writes_per_product_thresholds_into_the_bundle(smoke, tmp_path):
    """``calibrate-match`` writes ``thresholds.match_confidence`` and a card section, and the bundle
    still verifies; budgets the scans cannot meet leave it byte for byte as it was."""
    from rxvision_trainer.__main__ import main
    work, _ = smoke
    b = tmp_path / "b"
    shutil.copytree(work / "bundle", b)
    ndcs = [l["ndc"] for l in json.loads((b / "labels.json").read_text())]
    scans = tmp_path / "scans.csv"
    # Twenty images of each kind, so that both halves of the split check see them all.
    rows = [f"{i}-{p}.jpg,{ndcs[0]},own,{p}" for i in range(20) for p in (0.999, 0.97, 0.95)]
    rows += [f"u{i}-{p}.jpg,{ndcs[0]},unknown,{p}" for i in range(20) for p in (0.96, "")]
    scans.write_text("file,expected,case,matched_at\n" + "\n".join(rows) + "\n")
    assert main(["-q", "calibrate-match", str(b), "--scans", str(scans), "--unknown-budget", "0"]) == 0
    m = json.loads((b / "manifest.json").read_text())
    assert m["thresholds"]["match_confidence"] == {ndcs[0]: pytest.approx(0.97)}
    assert "## Per-product MATCH thresholds" in (b / "MODEL_CARD.md").read_text()
    assert verify_bundle(b)["cases"] >= 1

    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    scans.write_text("file,expected,case,matched_at\n" f"a.jpg,{ndcs[1]},own,1.0\n" f"b.jpg,{ndcs[1]},unknown,1.0\n")
    assert main(["-q", "calibrate-match", str(b), "--scans", str(scans), "--unknown-budget", "0"]) == 1
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    scans.write_text("file,expected,case\n")
    assert main(["-q", "calibrate-match", str(b), "--scans", str(scans)]) == 65
    assert main(["-q", "calibrate-match", str(b), "--scans", str(tmp_path / "missing.csv")]) == 65
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    scans.write_text("file,expected,case,matched_at\n" f"a.jpg,{ndcs[1]},own,0.99\n")
    assert main(["-q", "calibrate-match", str(tmp_path / "not-a-bundle"), "--scans", str(scans)]) == 65

    m["thresholds"]["match_confidence"] = {"00000-0000-00": 0.9}
    (b / "manifest.json").write_text(json.dumps(m))
    import hashlib
    digest = hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    (b / "manifest.json.sha256").write_text(f"{digest}  manifest.json\n")
    with pytest.raises(BundleCheckError, match="00000-0000-00"):
        verify_bundle(b)
