"""Smoke run of the whole pipeline on a tiny Pillow-drawn dataset (CI: must stay under 2 minutes on 2 cores).

    python -m rxvision_trainer.smoke [--keep DIR] [--device cpu|cuda|auto] [--epochs 1] [--per-class 16]
        [--loader tensor|pil]

Draws 6 classes x 16 images of coloured shapes (NDCs of the first 6 formulary
products) plus 8 images of a 7th product that is held out (open set), in the
``labels.csv`` layout; trains 1 epoch; writes a bundle; then checks that every
file's SHA-256 matches the manifest (recomputed here), that the manifest's own
checksum holds, and that ONNX Runtime on ``model.onnx`` reproduces
``selftest/expected.json``. Also checks the trainer's preprocessing copy
against ``models/fixture/reference_preprocess.py``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .data import Formulary, write_labels_csv
from .preprocess import MEAN, SCALE, STD, load_reference_module, preprocess, preprocess_pil

N_CLASSES = 6
PER_CLASS = 16
PER_HOLDOUT = 8
IMAGE_SIZE = (160, 160)
PALETTE = [(235, 235, 228), (240, 150, 60), (60, 110, 210), (220, 70, 90), (70, 170, 90), (230, 210, 60),
           (150, 90, 190)]
SHAPES = ["circle", "oval", "rect", "triangle", "diamond", "bar", "hexagon"]


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif kind == "oval":
        pts = [(1.3 * math.cos(t), 0.75 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif kind == "rect":
        pts = [(-1, -0.8), (1, -0.8), (1, 0.8), (-1, 0.8)]
    elif kind == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "diamond":
        pts = [(0, -1.1), (0.75, 0), (0, 1.1), (-0.75, 0)]
    elif kind == "bar":
        pts = [(-1.5, -0.45), (1.5, -0.45), (1.5, 0.45), (-1.5, 0.45)]
    else:  # hexagon
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 6, endpoint=False)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def draw(cls: int, rng: np.random.Generator) -> Image.Image:
    w, h = IMAGE_SIZE
    shade = rng.uniform(100, 150)
    bg = np.clip(shade + rng.normal(0, 6, size=(h, w, 1)) + rng.uniform(-5, 5, size=3), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    cx, cy = w / 2 + rng.uniform(-15, 15), h / 2 + rng.uniform(-15, 15)
    r = rng.uniform(30, 42)
    angle = rng.uniform(0, 2 * math.pi)
    color = tuple(int(np.clip(c + rng.uniform(-10, 10), 0, 255)) for c in PALETTE[cls])
    shadow = _polygon(SHAPES[cls], cx + 3, cy + 3, r, angle)
    d.polygon(shadow, fill=tuple(int(shade * 0.6) for _ in range(3)))
    d.polygon(_polygon(SHAPES[cls], cx, cy, r, angle), fill=color, outline=tuple(int(c * 0.8) for c in color))
    # a fake imprint: a few dark strokes
    for k in range(2):
        x0 = cx - r * 0.4 + k * r * 0.4
        d.line([(x0, cy - r * 0.2), (x0 + r * 0.2, cy + r * 0.2)], fill=tuple(int(c * 0.6) for c in color), width=2)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


def make_dataset(root: Path, formulary: Formulary, seed: int = 7, per_class: int = PER_CLASS,
                 per_holdout: int = PER_HOLDOUT) -> tuple[list[str], str]:
    products = formulary.products[: N_CLASSES + 1]
    rows = []
    for c, p in enumerate(products):
        n = per_class if c < N_CLASSES else per_holdout
        for i in range(n):
            rng = np.random.default_rng([seed, c, i])
            img = draw(c, rng)
            jpg = i % 4 == 3
            rel = f"images/{p['ndc']}/{i:03d}.{'jpg' if jpg else 'png'}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / rel, **({"format": "JPEG", "quality": 92} if jpg else {"format": "PNG"}))
            rows.append({"file": rel, "ndc": p["ndc"], "face": "front" if i % 2 == 0 else "back",
                         "name": p["name"], "strength": p["strength"],
                         "lookalike_group": p.get("lookalike_group") or "", "seed": f"{seed}-{c}-{i}"})
    write_labels_csv(root, rows)
    return [p["ndc"] for p in products[:N_CLASSES]], products[N_CLASSES]["ndc"]


def check_preprocess_matches_reference(images: list[Path]) -> bool:
    """The trainer's copy of the reference preprocessing gives bit-identical tensors; False outside a checkout."""
    ref = load_reference_module()
    if ref is None:
        return False
    for p in images:
        for size in (128, 97):
            a = preprocess(str(p), size, size, SCALE, MEAN, STD)
            b = ref.preprocess(str(p), size, size, SCALE, MEAN, STD)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f"preprocess differs on {p}"
            with Image.open(p) as im:
                assert np.array_equal(preprocess_pil(im, size, size, SCALE, MEAN, STD),
                                      ref.preprocess_pil(im, size, size, SCALE, MEAN, STD))
    return True


def check_bundle(bundle: Path) -> dict:
    """Independent re-check: hashes recomputed here, then ORT against expected.json."""
    import onnxruntime as ort

    mbytes = (bundle / "manifest.json").read_bytes()
    assert (bundle / "manifest.json.sha256").read_text() == f"{hashlib.sha256(mbytes).hexdigest()}  manifest.json\n"
    m = json.loads(mbytes)
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert on_disk == sorted([*m["files"], "manifest.json", "manifest.json.sha256"]), (on_disk, sorted(m["files"]))
    for rel, h in m["files"].items():
        assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == h, rel
    for required in ("model.onnx", "labels.json", "profile.json", "MODEL_CARD.md", "selftest/expected.json"):
        assert required in m["files"], required
    assert m["schema_version"] == 1 and m["purpose"] == "production" and m["profile"] == "profile.json"
    labels = json.loads((bundle / "labels.json").read_text())
    assert [l["index"] for l in labels] == list(range(m["num_classes"]))
    exp = json.loads((bundle / "selftest" / "expected.json").read_text())
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
    inp = m["input"]
    worst = 0.0
    for c in exp["cases"]:
        x = preprocess(str(bundle / "selftest" / c["image"]), inp["width"], inp["height"], inp["scale"],
                       inp["mean"], inp["std"])
        p = sess.run(None, {inp["name"]: x})[0][0]
        assert int(np.argmax(p)) == c["top1"] == c["label_index"], c["image"]
        worst = max(worst, float(np.abs(p - np.asarray(c["probs"], np.float32)).max()))
    assert worst <= exp["tolerance"], worst
    return {"cases": len(exp["cases"]), "max_abs_diff": worst, "tolerance": exp["tolerance"],
            "num_classes": m["num_classes"], "metrics": m["metrics"]}


def run_smoke(work: Path, device: str = "cpu", epochs: int = 1, per_class: int = PER_CLASS,
              verbose: bool = False, batch_size: int = 8, loader: str = "tensor") -> dict:
    from .__main__ import main as cli

    t0 = time.perf_counter()
    fpath = Formulary.default_path()
    if fpath is None:
        raise SystemExit("smoke: run inside an RxVision checkout (needs models/formulary/formulary.json)")
    formulary = Formulary(fpath)
    data = work / "data"
    classes, holdout = make_dataset(data, formulary, per_class=per_class,
                                    per_holdout=max(PER_HOLDOUT, per_class // 2))
    ref_checked = check_preprocess_matches_reference(sorted(data.rglob("*.png"))[:2] + sorted(data.rglob("*.jpg"))[:1])
    bundle = work / "bundle"
    rc = cli([*([] if verbose else ["-q"]), "train", "--data", str(data), "--out", str(bundle), "--version", "0.0.1",
              "--epochs", str(epochs), "--seed", "1", "--device", device, "--holdout-ndc", holdout,
              "--batch-size", str(batch_size), "--lr", "3e-3", "--loader", loader,
              "--warmup-epochs", "0.25", "--val-fraction", "0.25", "--calib-images", "64", "--name", "pillnet-smoke",
              "--created", "2026-01-01T00:00:00Z", "--no-mlflow",
              "--data-note", "Smoke-test data: coloured shapes drawn with Pillow, not pills."])
    if rc != 0:
        raise SystemExit(f"smoke: train exited {rc}")
    result = check_bundle(bundle)
    result.update({"seconds": round(time.perf_counter() - t0, 1), "classes": classes, "holdout": holdout,
                   "preprocess_matches_reference": ref_checked})
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temp dir)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--per-class", type=int, default=PER_CLASS, help=f"images per class (default {PER_CLASS})")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--loader", default="tensor", choices=["tensor", "pil"], help="training data path (train --loader)")
    ap.add_argument("--verbose", action="store_true", help="show the trainer's log (per-epoch times)")
    args = ap.parse_args(argv)
    kw = dict(device=args.device, epochs=args.epochs, per_class=args.per_class, verbose=args.verbose,
              batch_size=args.batch_size, loader=args.loader)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        res = run_smoke(args.keep, **kw)
    else:
        with tempfile.TemporaryDirectory(prefix="rxv-smoke-") as td:
            res = run_smoke(Path(td), **kw)
    res.pop("metrics", None)
    print(json.dumps(res))
    print(f"smoke: OK in {res['seconds']} s ({res['cases']} self-test cases, max |diff| {res['max_abs_diff']:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
