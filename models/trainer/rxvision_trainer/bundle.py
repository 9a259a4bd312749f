"""Writes and verifies a bundle exactly in the layout ``models/src/bundle.rs`` checks.

    manifest.json          schema_version 1, name, semver version, purpose ("production", or "fixture"
                           with ``train --purpose fixture``), created,
                           description, model, labels, profile, num_classes, input, output,
                           thresholds, selftest, provenance, metrics, files (SHA-256 of every other file)
    manifest.json.sha256   "<sha256>  manifest.json\\n"
    model.onnx             int8 QDQ, static shapes, Softmax in float
    labels.json            one entry per class in output order: index, ndc, name, strength, then
                           every other formulary attribute of the product
    profile.json           reference drift-feature and confidence distributions (see profile.py)
    MODEL_CARD.md          what the model is, its data, metrics and limits
    selftest/expected.json golden held-out images with ONNX Runtime's outputs
    selftest/*.png|jpg     the golden images (copied byte for byte from the dataset)

``append_card_section`` adds a section measured later (and re-hashes).
``verify_bundle`` re-checks a written bundle the way the Rust loader does
(checksums, listed/unlisted files, labels, self-test cases, graph I/O) and
re-runs the self-test with ONNX Runtime.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from .data import ClassInfo, Sample
from .export import INPUT_NAME, OUTPUT_NAME, session
from .preprocess import MEAN, SCALE, STD, preprocess, preprocess_pil

log = logging.getLogger("rxvision_trainer")

SCHEMA_VERSION = 1
SELFTEST_TOLERANCE = 0.02
SELFTEST_MIN_MARGIN = 0.1
SELFTEST_WOBBLE_TRIALS = 12
SELFTEST_MAX_WOBBLE = 0.01   # max |delta prob| under +-1 noise on every decoded pixel
SELFTEST_MAX_CANDIDATES = 40  # images tried per class before giving up on it
STREAM_WOBBLE = 5
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_json(p: Path, obj) -> None:
    p.write_text(json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


CROPS = ("square", "upright")


def input_spec(size: int, crop: str = "square", crop_margin: float | None = None) -> dict:
    """The manifest's ``input``. ``crop`` names how the counter cuts the pill out of the frame
    (``rxvision-synth dataset --pill-crops --crop``); ``square``, the default, is left out.
    ``crop_margin``: the room an upright crop leaves around the pill, a fraction of its length on
    each side (``--crop-margin``); ``None`` leaves it out, and the counter uses its localiser's."""
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r} is not one of {CROPS}")
    check_crop_margin(crop, crop_margin)
    spec = {"name": INPUT_NAME, "width": size, "height": size, "layout": "NCHW", "color": "RGB",
            "resize": "bilinear", "scale": SCALE, "mean": list(MEAN), "std": list(STD)}
    if crop != "square":
        spec["crop"] = crop
    if crop_margin is not None:
        spec["crop_margin"] = crop_margin
    return spec


def check_crop_margin(crop: str, crop_margin: float | None) -> None:
    """As the bundle loader (``rxvision_models::bundle::check_crop_margin``): a margin only for an
    upright crop, in 0..=1."""
    if crop_margin is None:
        return
    if crop != "upright":
        raise ValueError("a crop margin applies only to an upright crop")
    if not (isinstance(crop_margin, (int, float)) and 0.0 <= crop_margin <= 1.0):
        raise ValueError(f"crop margin {crop_margin!r} must lie in 0..=1 (a fraction of the pill's length on each side)")


# --------------------------------------------------------------------------- labels
def labels_json(classes: Sequence[ClassInfo]) -> list[dict]:
    out = []
    for c in classes:
        entry = {"index": c.index, "ndc": c.ndc, "name": c.name, "strength": c.strength}
        for k, v in c.attributes.items():
            if k not in entry:
                entry[k] = v
        out.append(entry)
    return out


# --------------------------------------------------------------------------- self-test
def perturbation_wobble(path: Path, sess: ort.InferenceSession, probs: np.ndarray, size: int,
                        seed_parts: Sequence[int]) -> float:
    """Max |delta prob| of the int8 model when the decoded image gets +-1 noise on every pixel.

    A consumer's decoder and rounding differ from Pillow's by a level here and
    there; the int8 graph re-rolls every activation's rounding on such changes,
    so golden cases must sit where that barely moves the output.
    """
    with Image.open(path) as im:
        base = np.asarray(im.convert("RGB"), np.int16)
    worst = 0.0
    for k in range(SELFTEST_WOBBLE_TRIALS):
        rng = np.random.default_rng([*seed_parts, k])
        noisy = np.clip(base + rng.integers(-1, 2, size=base.shape), 0, 255).astype(np.uint8)
        x = preprocess_pil(Image.fromarray(noisy), size, size, SCALE, MEAN, STD)
        worst = max(worst, float(np.abs(sess.run(None, {INPUT_NAME: x})[0][0] - probs).max()))
    return worst


def selftest_class_order(classes: Sequence[ClassInfo], max_cases: int) -> list[ClassInfo]:
    """Every look-alike group first (one member each, in group order), then the rest in output order."""
    groups: dict[str, list[ClassInfo]] = {}
    for c in classes:
        if c.lookalike_group:
            groups.setdefault(c.lookalike_group, []).append(c)
    first = [groups[g][0] for g in sorted(groups)]
    ungrouped = [c for c in classes if not c.lookalike_group]
    # the remaining group members round-robin, so that a budget cut still spreads over the groups
    rest: list[ClassInfo] = []
    depth = 1
    while any(depth < len(v) for v in groups.values()):
        rest += [groups[g][depth] for g in sorted(groups) if depth < len(groups[g])]
        depth += 1
    return (first + ungrouped + rest)[:max_cases]


@dataclass
class SelftestResult:
    cases: list[dict]
    skipped: list[str]


def select_selftest(out: Path, classes: Sequence[ClassInfo], candidates: Sequence[Sample],
                    sess: ort.InferenceSession, size: int, seed: int, max_cases: int) -> SelftestResult:
    """Copies one stable held-out image per chosen class into ``out/selftest`` with ORT's outputs."""
    sel = out / "selftest"
    sel.mkdir(parents=True, exist_ok=True)
    by_ndc: dict[str, list[Sample]] = {}
    for s in candidates:
        by_ndc.setdefault(s.ndc, []).append(s)
    cases, skipped = [], []
    for c in selftest_class_order(classes, max_cases):
        found = False
        pool = by_ndc.get(c.ndc, [])
        # PNG first: JPEG decoders differ by a few levels between libjpeg-turbo and zune-jpeg
        pool = sorted(pool, key=lambda s: (s.path.suffix.lower() not in (".png",), s.file))
        for attempt, s in enumerate(pool[:SELFTEST_MAX_CANDIDATES]):
            x = preprocess(str(s.path), size, size, SCALE, MEAN, STD)
            probs = sess.run(None, {INPUT_NAME: x})[0][0]
            order = np.argsort(-probs, kind="stable")
            margin = float(probs[order[0]] - probs[order[1]])
            if int(order[0]) != c.index or margin < SELFTEST_MIN_MARGIN:
                continue
            wobble = perturbation_wobble(s.path, sess, probs, size, [seed, STREAM_WOBBLE, c.index, attempt])
            if wobble > SELFTEST_MAX_WOBBLE:
                log.info("selftest: %s rejected (wobble %.4f)", s.file, wobble)
                continue
            ext = s.path.suffix.lower().replace(".jpeg", ".jpg")
            fname = f"c{c.index:03d}_{c.ndc}{ext}"
            shutil.copyfile(s.path, sel / fname)
            cases.append({"image": fname, "label_index": c.index,
                          "probs": [round(float(p), 6) for p in probs], "top1": int(order[0])})
            log.info("selftest: %s <- %s (p=%.4f, margin %.4f, wobble %.4f)", fname, s.file,
                     float(probs[c.index]), margin, wobble)
            found = True
            break
        if not found:
            skipped.append(c.ndc)
            log.warning("selftest: no stable held-out image for class %d (%s) among %d candidates",
                        c.index, c.ndc, min(len(pool), SELFTEST_MAX_CANDIDATES))
    if not cases:
        raise RuntimeError("no held-out image is classified right with a stable margin: the model is too weak "
                           "to ship (train longer or check the data)")
    return SelftestResult(cases, skipped)


# --------------------------------------------------------------------------- manifest
def finalize(out: Path, manifest: dict) -> dict:
    """Hashes every file, writes manifest.json and manifest.json.sha256; returns the manifest."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel not in ("manifest.json", "manifest.json.sha256"):
            files[rel] = sha256_file(p)
    manifest = dict(manifest)
    manifest["files"] = dict(sorted(files.items()))
    write_json(out / "manifest.json", manifest)
    (out / "manifest.json.sha256").write_text(f"{sha256_file(out / 'manifest.json')}  manifest.json\n",
                                              encoding="utf-8")
    return manifest


def check_replaceable(dest: Path, name: str) -> None:
    """Only ever replace an empty directory or a previous bundle of the same name."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise SystemExit(f"refusing to overwrite {dest}: not a directory")
    if not any(dest.iterdir()):
        return
    try:
        ours = json.loads((dest / "manifest.json").read_text()).get("name") == name
    except (ValueError, OSError, AttributeError):
        ours = False
    if not ours:
        raise SystemExit(f"refusing to overwrite {dest}: not empty and not a {name} bundle")


def append_card_section(root: str | Path, text: str) -> dict:
    """Appends ``text`` (a Markdown section) to the bundle's MODEL_CARD.md and re-hashes the bundle.

    For facts measured after training (e.g. ``rxvisiond eval`` on a fresh set). The bundle must verify
    first (hashes and contract); the manifest keeps every field and gets the card's new SHA-256, and
    ``manifest.json.sha256`` is rewritten. Returns ``verify_bundle``'s result on the amended bundle.
    """
    root = Path(root)
    verify_bundle(root, run_selftest=False)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    if "MODEL_CARD.md" not in manifest["files"]:
        raise BundleCheckError("MODEL_CARD.md is not listed in the manifest")
    if not text.strip():
        raise ValueError("empty model card section")
    card = root / "MODEL_CARD.md"
    card.write_text(card.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + text.strip("\n") + "\n",
                    encoding="utf-8")
    finalize(root, manifest)
    return verify_bundle(root)


def set_match_thresholds(root: str | Path, thresholds: dict[str, float], section: str) -> dict:
    """Writes per-product MATCH thresholds (``thresholds.match_confidence``) into a verified bundle, appends
    ``section`` (how they were calibrated) to its card and re-hashes it; returns ``verify_bundle``'s result."""
    root = Path(root)
    verify_bundle(root, run_selftest=False)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    manifest["thresholds"] = {k: v for k, v in manifest["thresholds"].items() if k != "match_confidence"}
    if thresholds:
        manifest["thresholds"]["match_confidence"] = dict(sorted(thresholds.items()))
    finalize(root, manifest)
    return append_card_section(root, section)


# --------------------------------------------------------------------------- verification
class BundleCheckError(AssertionError):
    pass


def verify_bundle(root: str | Path, run_selftest: bool = True) -> dict:
    """Checks a bundle directory as the Rust loader does, then re-runs its self-test in ORT.

    Returns {"cases": n, "max_abs_diff": d, "tolerance": t}.
    """
    root = Path(root)

    def fail(msg: str):
        raise BundleCheckError(msg)

    mbytes = (root / "manifest.json").read_bytes()
    line = (root / "manifest.json.sha256").read_text(encoding="utf-8")
    if line != f"{hashlib.sha256(mbytes).hexdigest()}  manifest.json\n":
        fail("manifest.json.sha256 does not match manifest.json")
    m = json.loads(mbytes)
    required = {"schema_version", "name", "version", "purpose", "created", "description", "model", "labels",
                "num_classes", "input", "output", "thresholds", "selftest", "provenance", "metrics", "files"}
    allowed = required | {"profile"}
    if set(m) - allowed or required - set(m):
        fail(f"manifest keys: unknown {sorted(set(m) - allowed)}, missing {sorted(required - set(m))}")
    if m["schema_version"] != SCHEMA_VERSION:
        fail("schema_version")
    if not SEMVER.match(m["version"]):
        fail(f"version {m['version']!r} is not semver")
    if m["purpose"] not in ("production", "fixture"):
        fail("purpose")
    inp = m["input"]
    if (set(inp) - {"crop", "crop_margin"} != set(input_spec(1)) or inp["layout"] != "NCHW" or inp["color"] != "RGB"
            or inp["resize"] != "bilinear" or inp.get("crop", "square") not in CROPS):
        fail(f"input spec {inp}")
    try:
        check_crop_margin(inp.get("crop", "square"), inp.get("crop_margin"))
    except ValueError as e:
        fail(f"input.crop_margin: {e}")
    if set(m["output"]) != {"name", "kind"} or m["output"]["kind"] != "probabilities":
        fail(f"output spec {m['output']}")
    t = m["thresholds"]
    per_product = t.get("match_confidence", {})
    if (set(t) - {"match_confidence"} != {"min_confidence", "min_margin"}
            or not all(0.0 <= t[k] <= 1.0 for k in ("min_confidence", "min_margin"))
            or not isinstance(per_product, dict) or not all(0.0 <= v <= 1.0 for v in per_product.values())):
        fail(f"thresholds {t}")
    if set(m["selftest"]) != {"expected", "tolerance"} or not 0 < m["selftest"]["tolerance"] < 1:
        fail("selftest spec")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    present -= {"manifest.json", "manifest.json.sha256"}
    listed = set(m["files"])
    if present - listed:
        fail(f"unlisted files {sorted(present - listed)}")
    if listed - present:
        fail(f"missing files {sorted(listed - present)}")
    for rel, h in m["files"].items():
        if sha256_file(root / rel) != h:
            fail(f"{rel}: SHA-256 mismatch")
    for k in ("model", "labels"):
        if m[k] not in listed:
            fail(f"{k} {m[k]} not listed")
    if m["selftest"]["expected"] not in listed or (m.get("profile") and m["profile"] not in listed):
        fail("selftest/profile not listed")
    labels = json.loads((root / m["labels"]).read_text(encoding="utf-8"))
    if len(labels) != m["num_classes"] or [l["index"] for l in labels] != list(range(len(labels))):
        fail("labels.json count/order")
    if any(not str(l.get("ndc", "")).strip() or not str(l.get("name", "")).strip() for l in labels):
        fail("labels.json: empty ndc or name")
    if len({l["ndc"] for l in labels}) != len(labels):
        fail("labels.json: duplicate ndc")
    strangers = sorted(set(per_product) - {l["ndc"] for l in labels})
    if strangers:
        fail(f"thresholds.match_confidence names products the model lacks: {strangers}")
    exp = json.loads((root / m["selftest"]["expected"]).read_text(encoding="utf-8"))
    st_dir = root / Path(m["selftest"]["expected"]).parent
    if not exp["cases"]:
        fail("self-test has no cases")
    for c in exp["cases"]:
        if not (st_dir / c["image"]).is_file() or len(c["probs"]) != m["num_classes"]:
            fail(f"self-test case {c['image']}")
    model = onnx.load(str(root / m["model"]))
    from .export import check_contract
    try:
        check_contract(model, m["num_classes"], inp["width"])
    except AssertionError as e:
        fail(f"model.onnx: {e}")
    if inp["width"] != inp["height"]:
        fail("non-square input")
    result = {"cases": len(exp["cases"]), "max_abs_diff": None, "tolerance": m["selftest"]["tolerance"]}
    if run_selftest:
        sess = session(root / m["model"])
        worst = 0.0
        for c in exp["cases"]:
            x = preprocess(str(st_dir / c["image"]), inp["width"], inp["height"], inp["scale"], inp["mean"], inp["std"])
            p = sess.run(None, {inp["name"]: x})[0][0]
            if int(np.argmax(p)) != c["top1"]:
                fail(f"self-test {c['image']}: ORT top-1 {int(np.argmax(p))} != expected {c['top1']}")
            worst = max(worst, float(np.abs(p - np.asarray(c["probs"])).max()))
        if worst > m["selftest"]["tolerance"]:
            fail(f"self-test: max |diff| {worst} above tolerance")
        result["max_abs_diff"] = worst
    return result


# --------------------------------------------------------------------------- model card
def _pct(x) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"


def _f(x, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def model_card(info: dict) -> str:
    """MODEL_CARD.md from the run's facts (``pipeline`` fills ``info``)."""
    m = info["metrics"]
    th = info["thresholds"]
    os_ = m["open_set"]
    groups = m["per_group_top1_int8"]
    group_rows = "\n".join(
        f"| {g} | {m['per_group_n'][g]} | {_f(m['per_group_top1_f32'][g])} | {_f(groups[g])} |" for g in groups
    ) or "| (no look-alike groups among the classes) | | | |"
    class_rows = "\n".join(
        f"| {c['index']} | {c['ndc']} | {c['name']} | {c['strength']} | {c.get('lookalike_group') or ''} |"
        for c in info["labels"]
    )
    holdout = ", ".join(os_["holdout_ndcs"]) or "none"
    if os_["n_select"]:
        open_set = (
            f"- Held-out products (never trained): {holdout}; {os_['n_select']} of their images were used to "
            f"choose the thresholds"
            + (f" and {os_['n_report']} others to report the rate" if not os_["report_is_selection_set"] else
               " and to report the rate (the same images, so the rate is **optimistic**; `rxvisiond eval` on a "
               "freshly rendered set is the real test)")
            + f".\n- UNCERTAIN rate on held-out products: **{_pct(os_['uncertain_rate'])}** "
              f"(target >= 90%: {'met' if os_['target_met'] else 'NOT met'}).\n"
        )
    else:
        open_set = "- No products were held out (`--holdout-ndc`): the open-set UNCERTAIN rate is unmeasured.\n"
    features = info["profile_features_note"]
    fixture = ""
    if info.get("purpose", "production") == "fixture":
        fixture = (
            "**This is a test fixture (`purpose: fixture`), not a pill model.** It knows only the "
            f"{m['num_classes']} products listed under Classes, was trained on a small synthetic set for tests and "
            "demos, and must never be used to identify or verify real medication. Default bundle discovery "
            "prefers any production bundle over it.\n\n"
        )
    return f"""# MODEL CARD: {info['name']} {info['version']}

{fixture}A pill classifier for the RxVision counter: one cropped top-down photo of a
pill in, a calibrated probability for each of {m['num_classes']} formulary products out.
**Trained and measured on synthetic images only. Its accuracy on real
photos is unmeasured. Not for clinical use** until it has been validated on
real photos of the products a pharmacy stocks (see Limits).

## Model

- {info['arch']}; {m['macs'] / 1e6:.1f} MMAC and {m['params'] / 1e3:.1f} k parameters at
  {info['size']}x{info['size']}. Plain dense 3x3 convolutions because tract (the CPU engine)
  runs them fastest; no depthwise or residual blocks (README, Performance).
- Input `{INPUT_NAME}` [1,3,{info['size']},{info['size']}] float32 NCHW RGB: Pillow 12 bilinear resize, then
  `(pixel / 255 - mean) / std` with ImageNet mean/std (`models/fixture/reference_preprocess.py`).
  Output `{OUTPUT_NAME}` [1,{m['num_classes']}]: temperature-calibrated Softmax.
- `model.onnx`: ONNX Runtime static QDQ int8 (per-channel int8 weights, uint8 activations, MinMax
  calibration on {info['calib_images']} un-augmented training images; BatchNorm folded before export;
  the logits (Gemm output) and the Softmax stay float). Op types: {info['ops']}.
- Sizes: float32 model {m['model_bytes_f32']} bytes (not shipped), int8 `model.onnx`
  {m['model_bytes_int8']} bytes ({_pct(m['int8_size_ratio'])} of float32).

## Data

- {info['data_note']}
- Training: {m['train_n']} images of {m['num_classes']} products; validation: {m['val_n']} images
  ({info['val_source']}). Classes are the formulary products present in the data minus the held-out ones.
- Augmentation (training only): {info['augment']}.
- Open set in training: {info['outliers']}.
- Dataset fingerprints (SHA-256 of labels.csv): {info['data_fingerprints']}.

## Training

`{info['command']}`

{m['epochs']} epoch(s), seed {info['seed']}, device {info['device']}, AdamW (lr {info['lr']}, weight decay
{info['weight_decay']}, batch {info['batch_size']}), warm-up then cosine decay. Last epoch: train
top-1 {_f(m['train_top1_last_epoch'])}. torch {info['torch']}, onnx {onnx.__version__}, onnxruntime
{ort.__version__}.

## Metrics (validation split, {m['val_n']} images)

| model | top-1 | top-3 | ECE (15 bins) |
|---|---|---|---|
| float32, before temperature scaling | {_f(m['val_top1_f32'])} | {_f(m['val_top3_f32'])} | {_f(m['ece_f32_uncalibrated'])} |
| float32, temperature {m['temperature']:.4f} | {_f(m['val_top1_f32'])} | {_f(m['val_top3_f32'])} | {_f(m['ece_f32_calibrated'])} |
| int8 `model.onnx` (shipped) | {_f(m['val_top1_int8'])} | {_f(m['val_top3_int8'])} | {_f(m['ece_int8'])} |

int8 minus float32 top-1: {m['int8_minus_f32_top1_points']:+.2f} points. The temperature (bounded below by
{info['min_temperature']}) was fitted on the same validation split it is measured on.

Per look-alike group (top-1):

| group | images | float32 | int8 |
|---|---|---|---|
{group_rows}

## Open set and thresholds

A verdict is UNCERTAIN when the top-1 probability is below `min_confidence` or the top-1/top-2 gap is
below `min_margin`. Shipped: `min_confidence` = {th['min_confidence']}, `min_margin` = {th['min_margin']}
({th['method']}).

{open_set}- In-formulary validation images at these thresholds: {_pct(th['in_formulary_uncertain_rate'])} UNCERTAIN,
  accepted ones right {_pct(th['in_formulary_accepted_accuracy'])}, accepted and wrong
  {_pct(th['in_formulary_wrong_accept_rate'])} of all.

## Self-test

`selftest/` holds {info['selftest_cases']} held-out validation images (copied byte for byte; one per class,
every look-alike group first) and `selftest/expected.json` the probabilities ONNX Runtime {ort.__version__} gives
for `model.onnx`; tolerance {SELFTEST_TOLERANCE}. Each was picked so that the top-1 is right with a top-1/top-2
margin >= {SELFTEST_MIN_MARGIN} and {SELFTEST_WOBBLE_TRIALS} trials of +-1 noise on every decoded pixel move no
probability by more than {SELFTEST_MAX_WOBBLE}.{info['selftest_skipped']}

## Reference profile

`profile.json`: the int8 model's top-1 and margin distribution on the validation images (and on held-out
products), the class mix, and the drift features: {features}

## Limits

- **Synthetic data only.** Every image it was trained and measured on was rendered; real counter photos
  (camera, lighting, real tablet finish and wear, manufacturer changes) are not represented. Real-photo
  accuracy is **unmeasured**; the numbers above do not transfer to it.
- The formulary's attributes (imprints, sizes, colours, NDCs) were written from memory and partly made up
  (`illustrative`); a product here may not look like the real one (`models/formulary/README.md`).
- Only the {m['num_classes']} products above are known; anything else must come back UNCERTAIN, which the
  thresholds only make likely{'' if os_['n_select'] else ' (unmeasured here)'}.
- One pill per image, top-down, cropped roughly as the training data was.

## Classes

| index | ndc | name | strength | look-alike group |
|---|---|---|---|---|
{class_rows}
"""


__all__ = ["model_card", "finalize", "append_card_section", "labels_json", "select_selftest", "verify_bundle",
           "input_spec", "check_replaceable", "write_json", "sha256_file"]
