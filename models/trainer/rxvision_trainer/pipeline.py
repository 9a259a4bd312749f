"""The ``train`` command end to end: data -> model -> calibration -> int8 -> bundle.

1. read the dataset(s) and the formulary; classes are the products in the data
   minus ``--holdout-ndc``; validation is ``--val-data`` or a stratified split
2. train PillNet (augmented, reference preprocessing)
3. temperature scaling on the validation split (ECE before/after)
4. fold BN, export the float ONNX graph (temperature folded in), check it
   against torch
5. quantize to int8 QDQ with ONNX Runtime on training images
6. evaluate f32 and int8 on validation (top-1/3, per look-alike group, ECE) and
   on held-out products; choose the thresholds
7. self-test set, reference profile, labels, model card, manifest
8. verify the written bundle (hashes, contract, ORT self-test); log to mlflow
   when it is installed
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from . import __version__
from .bundle import (check_crop_margin, check_replaceable, finalize, input_spec, labels_json, model_card, select_selftest,
                     verify_bundle, write_json, SELFTEST_TOLERANCE, SEMVER)
from .calibrate import choose_thresholds, ece, fit_temperature, softmax, topk_accuracy, uncertain_mask
from .data import (JPEG_QUALITY_MAX, Augment, AugmentConfig, DataError, Formulary, ImageDataset, OutlierDataset,
                   Sample, build_classes, check_jpeg_quality, load_eval_array, parse_ndc_list, read_dataset,
                   split_train_val)
from .export import build_float_model, op_counts, ort_predict, quantize, run_all, session
from .imprint import ALPHABET, COUNT_BINS, bags
from .model import ArchConfig, PillNet, count_cost, fuse, fused_forward
from .profile import build_profile
from .train import (IMPOSTOR_LOSSES, CheckpointError, LoaderSource, Resumable, TrainConfig, default_workers,
                    load_initial_weights, outlier_batch_size, predict_logits, resolve_device, seed_everything, train)

log = logging.getLogger("rxvision_trainer")

DEFAULT_DATA_NOTE = ("Synthetic images only, rendered by rxvision-synth from models/formulary/formulary.json "
                     "(top-down pill photos on a counting tray with lighting, blur, noise and JPEG nuisances).")


def add_train_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", type=Path, required=True, help="training dataset directory (labels.csv layout)")
    ap.add_argument("--val-data", type=Path, help="validation dataset directory; default: a split of --data")
    ap.add_argument("--out", type=Path, required=True, help="bundle directory to write (replaced if it is one)")
    ap.add_argument("--version", required=True, help="semantic version of the model, e.g. 1.0.0")
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--size", type=int, default=128, help="square model input size (default 128)")
    ap.add_argument("--crop", default="square", choices=["square", "upright"],
                    help="how the data's pill crops were cut (rxvision-synth dataset --pill-crops --crop); "
                         "written to the manifest so the counter cuts the same way (default square)")
    ap.add_argument("--crop-margin", type=float,
                    help="the margin the data's upright crops were cut with (rxvision-synth dataset --crop-margin), "
                         "a fraction of the pill's length on each side; written to the manifest as input.crop_margin "
                         "(default: none, the counter's localiser margin 0.3)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--synth", help="path to the rxvision-synth binary (drift features for profile.json)")
    ap.add_argument("--formulary", type=Path, help="formulary.json (default: the checkout's models/formulary)")
    ap.add_argument("--holdout-ndc", default="", help="comma-separated NDCs to leave out of training (open set)")
    ap.add_argument("--name", default="pillnet", help="model family name (default pillnet)")
    ap.add_argument("--purpose", default="production", choices=["production", "fixture"],
                    help="manifest purpose (default production); fixture: a test/demo bundle that loses to any "
                         "production bundle in default discovery, said so in the description and the model card")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--outlier-weight", type=float, default=0.5,
                    help="outlier-exposure loss weight (synthetic unknown pills pushed to uniform); 0 turns it off")
    ap.add_argument("--outlier-fraction", type=float, default=0.25, help="outlier images per batch (share)")
    ap.add_argument("--impostor-share", type=float, default=0.5,
                    help="share of the outlier slots given to the data's rendered impostors, when it has them "
                         "(default 0.5; the rest are chimeras and hue-turned pills)")
    ap.add_argument("--impostor-loss", default="uniform", choices=list(IMPOSTOR_LOSSES),
                    help="loss of an impostor of a known product: uniform (outlier exposure, the default) or away "
                         "(-log(1 - p(the product it imitates)))")
    ap.add_argument("--imprint-weight", type=float, default=0.0,
                    help="weight of an imprint-reading head's loss (0: no such head): the model also learns to count "
                         "the characters of the imprint in view (the data's `imprint` column; tensor loader only)")
    ap.add_argument("--imprint-hidden", type=int, default=0,
                    help="the imprint head's hidden width: a 1x1 conv + ReLU on the last feature map before pooling "
                         "(default 0: a linear read of the pooled features)")
    ap.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                    help="start from the weights of another run's training checkpoint (the same classes and "
                         "architecture) instead of random ones; the schedule starts afresh")
    ap.add_argument("--min-temperature", type=float, default=0.5,
                    help="lower bound of the fitted temperature (a near-perfect validation split would otherwise "
                         "drive it to 0 and saturate every probability, unknown pills included)")
    ap.add_argument("--widths", default="32,64,128,256", help="stage widths (default 32,64,128,256)")
    ap.add_argument("--depths", default="1,1,1,1", help="extra stride-1 convs per stage (default 1,1,1,1)")
    ap.add_argument("--stem", type=int, default=0,
                    help="width of a stride-1 convolution at the input's full resolution before the first stage "
                         "(default 0: none)")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds for the training loop (0: none); after epoch 1 the epoch count is cut to what "
                         "fits, and the run equals one with --epochs set to that count (warm-up >= 1 epoch)")
    ap.add_argument("--checkpoint", type=Path,
                    help="train across sessions: resume from this file when it exists (it must be this run's: same "
                         "recipe, classes and image bytes) and save the state there after every epoch")
    ap.add_argument("--pause-at", type=_deadline, metavar="TIME",
                    help="with --checkpoint: end this session after the last epoch expected to finish before TIME "
                         "(ISO 8601 with a zone, e.g. 2026-11-28T06:30Z); exits 75, to be run again to go on")
    ap.add_argument("--loader", default="tensor", choices=["tensor", "pil"],
                    help="tensor (default): decode every image once, augment batches on the training device; "
                         "pil: Pillow decoding and augmentation per image in DataLoader workers (the old path)")
    ap.add_argument("--workers", type=int, default=-1,
                    help="tensor loader: decoding processes (default: CPU count, at most 16); pil loader: DataLoader "
                         "workers (default: by device)")
    ap.add_argument("--no-decode-cache", action="store_true",
                    help="tensor loader: do not read or write the decoded-image cache (DATASET/.rxv-decoded/)")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="validation share when no --val-data")
    ap.add_argument("--calib-images", type=int, default=256, help="training images for int8 calibration")
    ap.add_argument("--selftest-max", type=int, default=24, help="most self-test images (one per class)")
    ap.add_argument("--open-set-target", type=float, default=0.90,
                    help="share of held-out-product images that must come back UNCERTAIN")
    ap.add_argument("--min-confidence", type=float, default=0.6, help="threshold when nothing is held out")
    ap.add_argument("--min-margin", type=float, default=0.2, help="threshold when nothing is held out")
    ap.add_argument("--mirror", type=float, default=0.0,
                    help="probability of a mirror flip in augmentation (default 0: mirrors imprints)")
    ap.add_argument("--max-rotation", type=float, default=AugmentConfig.max_rotation_deg,
                    help=f"largest small rotation in augmentation, degrees (default "
                         f"{AugmentConfig.max_rotation_deg:g}; the 180-degree turn is separate)")
    ap.add_argument("--max-shift", type=float, default=AugmentConfig.max_shift,
                    help=f"largest shift in augmentation, fraction of the image size (default "
                         f"{AugmentConfig.max_shift:g})")
    ap.add_argument("--gamma", type=float, default=0.0,
                    help="tone-curve augmentation: exponent with ln g uniform in +-ln(1 + this) (default 0: off)")
    ap.add_argument("--cast", type=float, default=0.0,
                    help="white-balance augmentation: red and blue gains 1 +- this (default 0: off)")
    ap.add_argument("--jpeg-quality", type=_jpeg_quality, default=0,
                    help="JPEG augmentation: half of the images re-encoded at a quality drawn uniformly from this "
                         "to 95 (default 0: off)")
    ap.add_argument("--data-note", default=DEFAULT_DATA_NOTE, help="one line on the data for the model card")
    ap.add_argument("--artifacts", type=Path,
                    help="also keep the float ONNX model, the torch checkpoint and the history here")
    ap.add_argument("--created", help="RFC 3339 creation time (default: SOURCE_DATE_EPOCH or now)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to mlflow even if it is installed")


class TrainingPaused(Exception):
    """The session's deadline came before the last epoch; the checkpoint holds the run."""


def _jpeg_quality(text: str) -> int:
    try:
        q = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    try:
        return check_jpeg_quality(q)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _deadline(text: str) -> float:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-28T06:30Z)") from None
    if t.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z or +HH:MM)")
    return t.timestamp()


def content_fingerprint(d: Path, samples: list[Sample]) -> str:
    """SHA-256 of labels.csv and the bytes of every image it lists, in its order (what a resumed run must see)."""
    h = hashlib.sha256((d / "labels.csv").read_bytes())
    for s in samples:
        h.update(s.file.encode() + b"\0")
        h.update(s.path.read_bytes())
    return h.hexdigest()


def run_identity(args: argparse.Namespace, classes: list, data: list[Sample], val_all: list[Sample] | None) -> dict:
    """What makes a resumable run this run: every input of the training loop except the device and the deadline."""
    ident = {k: getattr(args, k) for k in ("epochs", "seed", "size", "batch_size", "lr", "weight_decay",
                                           "warmup_epochs", "label_smoothing", "outlier_weight", "outlier_fraction",
                                           "widths", "depths", "mirror", "max_rotation", "max_shift")}
    for knob in ("gamma", "cast", "jpeg_quality"):  # in the identity only when on: runs from before the knobs resume
        if getattr(args, knob, 0.0):
            ident[knob] = getattr(args, knob)
    if getattr(args, "stem", 0):
        ident["stem"] = args.stem
    if getattr(args, "impostor_share", 0.5) != 0.5:
        ident["impostor_share"] = args.impostor_share
    if getattr(args, "impostor_loss", "uniform") != "uniform":
        ident["impostor_loss"] = args.impostor_loss
    if getattr(args, "imprint_weight", 0.0):
        ident["imprint_weight"] = args.imprint_weight
        ident["imprint_hidden"] = getattr(args, "imprint_hidden", 0)
    if getattr(args, "init_from", None) is not None:
        ident["init_from"] = hashlib.sha256(Path(args.init_from).read_bytes()).hexdigest()
    ident["loader"] = getattr(args, "loader", "tensor")
    ident["classes"] = [c.ndc for c in classes]
    ident["data"] = content_fingerprint(args.data, data)
    if val_all is not None:
        ident["val_data"] = content_fingerprint(args.val_data, val_all)
    return ident


def _created(arg: str | None) -> str:
    if arg:
        return arg
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return t.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _fingerprint(d: Path) -> str:
    return hashlib.sha256((d / "labels.csv").read_bytes()).hexdigest()[:16]


def _r(x, nd: int = 4):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def _calibration_subset(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    """Round-robin over classes (deterministic shuffle inside each) so every class is in the ranges."""
    by: dict[str, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.ndc, []).append(s)
    rng = np.random.default_rng([seed, 7])
    queues = {k: [v[i] for i in rng.permutation(len(v))] for k, v in sorted(by.items())}
    out: list[Sample] = []
    depth = 0
    while len(out) < n and any(depth < len(q) for q in queues.values()):
        for k in sorted(queues):
            if depth < len(queues[k]) and len(out) < n:
                out.append(queues[k][depth])
        depth += 1
    return out


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    if not SEMVER.match(args.version):
        raise SystemExit(f"--version {args.version!r} is not a semantic version (X.Y.Z)")
    if args.size < 32 or args.size % 16:
        raise SystemExit("--size must be a multiple of 16, at least 32")
    try:
        check_crop_margin(args.crop, getattr(args, "crop_margin", None))
    except ValueError as e:
        raise SystemExit(f"--crop-margin: {e}") from None
    dest = args.out.resolve()
    check_replaceable(dest, args.name)
    impostor_share = getattr(args, "impostor_share", 0.5)
    if not 0.0 <= impostor_share <= 1.0:
        raise SystemExit(f"--impostor-share {impostor_share} is not a share between 0 and 1")
    imprint_weight = getattr(args, "imprint_weight", 0.0)
    if imprint_weight < 0:
        raise SystemExit(f"--imprint-weight {imprint_weight} is negative")
    if getattr(args, "stem", 0) < 0:
        raise SystemExit(f"--stem {args.stem} is negative")
    if getattr(args, "imprint_hidden", 0) < 0:
        raise SystemExit(f"--imprint-hidden {args.imprint_hidden} is negative")
    if imprint_weight and getattr(args, "loader", "tensor") != "tensor":
        raise SystemExit("--imprint-weight needs the tensor loader (--loader tensor)")
    init_from = getattr(args, "init_from", None)
    if init_from is not None and not Path(init_from).is_file():
        raise CheckpointError(f"--init-from {init_from}: no such checkpoint file")

    # ---- data
    fpath = args.formulary or Formulary.default_path()
    formulary = Formulary(fpath) if fpath else None
    if formulary is None:
        log.warning("no formulary found (--formulary): labels.json entries get name/strength from labels.csv only")
    holdout = set(parse_ndc_list(args.holdout_ndc))
    data = read_dataset(args.data)
    impostors = [s for s in data if s.imitates and s.imitates not in holdout]
    classes = build_classes(data, formulary, holdout)
    class_of = {c.ndc: c.index for c in classes}
    known = [s for s in data if s.ndc in class_of]
    unknown_select = [s for s in data if s.ndc in holdout]
    val_all = None
    missing = holdout - {s.ndc for s in data}
    if missing:
        log.warning("held-out NDC(s) without images in --data: %s", ", ".join(sorted(missing)))
    if args.val_data:
        val_all = read_dataset(args.val_data)
        train_s = known
        val_s = [s for s in val_all if s.ndc in class_of]
        unknown_report = [s for s in val_all if s.ndc not in class_of]
        val_source = f"separate dataset {args.val_data}"
    else:
        train_s, val_s = split_train_val(known, args.val_fraction, args.seed)
        unknown_report = []
        val_source = f"a stratified {args.val_fraction:.0%} split of the training dataset (seed {args.seed})"
    if not unknown_report:
        unknown_report = unknown_select
    report_is_selection = unknown_report is unknown_select
    if not val_s:
        raise DataError("no validation images of the training classes")
    if imprint_weight:
        unread = [s for s in train_s + impostors if s.imprint is None]
        if unread:
            raise DataError(f"{args.data}: --imprint-weight needs the imprint of every training image, and "
                            f"{len(unread)} have none (labels.csv has no `imprint` column; rxvision-synth "
                            f"writes one: render the data again)")
    log.info("%d classes; %d training, %d validation images; held out %d products (%d + %d images); "
             "%d impostor images for outlier exposure",
             len(classes), len(train_s), len(val_s), len(holdout), len(unknown_select),
             0 if report_is_selection else len(unknown_report), len(impostors))

    # ---- model and training
    resumable = None
    checkpoint = getattr(args, "checkpoint", None)
    if getattr(args, "pause_at", None) is not None and checkpoint is None:
        raise SystemExit("--pause-at needs --checkpoint (where the paused run is kept)")
    if checkpoint is not None:
        if args.time_budget:
            raise SystemExit("--time-budget shortens the schedule; --checkpoint keeps it over sessions: use one")
        t_fp = time.perf_counter()
        resumable = Resumable(checkpoint, run_identity(args, classes, data, val_all), getattr(args, "pause_at", None))
        log.info("resumable run: checkpoint %s (data fingerprinted in %.1f s)", checkpoint,
                 time.perf_counter() - t_fp)
    device = resolve_device(args.device)
    seed_everything(args.seed, deterministic=True)
    arch = ArchConfig(tuple(int(w) for w in args.widths.split(",")), tuple(int(d) for d in args.depths.split(",")),
                      imprint_outputs=(len(ALPHABET), COUNT_BINS) if imprint_weight else (0, 0),
                      imprint_hidden=getattr(args, "imprint_hidden", 0) if imprint_weight else 0,
                      stem=getattr(args, "stem", 0))
    model = PillNet(len(classes), arch)
    if init_from is not None:
        load_initial_weights(init_from, model, [c.ndc for c in classes])
        log.info("starting from the weights of %s", init_from)
    cost = count_cost(model, args.size)
    log.info("architecture: %s", arch.describe())
    log.info("cost at %dx%d: %s", args.size, args.size, cost.summary())
    print(f"architecture: {arch.describe()}; {cost.macs / 1e6:.1f} MMAC, {cost.params} parameters "
          f"at {args.size}x{args.size}", flush=True)
    aug_cfg = AugmentConfig(p_mirror=args.mirror, max_rotation_deg=args.max_rotation, max_shift=args.max_shift,
                            gamma=args.gamma, cast=args.cast, jpeg_quality=getattr(args, "jpeg_quality", 0))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
                      outlier_weight=args.outlier_weight, outlier_fraction=args.outlier_fraction,
                      impostor_loss=getattr(args, "impostor_loss", "uniform"), imprint_weight=imprint_weight,
                      workers=args.workers, seed=args.seed, time_budget=args.time_budget)
    loader = getattr(args, "loader", "tensor")
    t_data = time.perf_counter()
    if loader == "tensor":
        from .tensordata import TensorAugment, TensorEvalSet, TensorTrainSource, load_decoded

        cache = not getattr(args, "no_decode_cache", False)
        dec = load_decoded(args.data, data, args.size, workers=args.workers, cache=cache).to(device)
        dec_val = (load_decoded(args.val_data, val_all, args.size, workers=args.workers, cache=cache).to(device)
                   if args.val_data else dec)
        source = TensorTrainSource(dec, train_s, class_of, TensorAugment(aug_cfg), args.seed, args.batch_size,
                                   device, outlier_batch=outlier_batch_size(cfg), impostors=impostors,
                                   p_impostor=impostor_share,
                                   bags=((bags([s.imprint for s in train_s]), bags([s.imprint for s in impostors]))
                                         if imprint_weight else None))
        val_ds = TensorEvalSet(dec_val, val_s, class_of, device)
        eval_workers = 0
    else:
        train_ds = ImageDataset(train_s, class_of, args.size, Augment(aug_cfg), seed=args.seed)
        val_ds = ImageDataset(val_s, class_of, args.size)
        outlier_ds = OutlierDataset(train_s, class_of, args.size, Augment(aug_cfg), seed=args.seed,
                                    impostors=impostors, p_impostor=impostor_share) if args.outlier_weight > 0 else None
        source = LoaderSource(train_ds, outlier_ds, cfg, device)
        eval_workers = default_workers(device) if args.workers < 0 else args.workers
    t_data = time.perf_counter() - t_data
    log.info("training on %s (%s loader)", device, loader)
    history = train(model, source, cfg, device, val_ds=val_ds, resumable=resumable)
    if len(history) < cfg.epochs:
        raise TrainingPaused(f"training paused after epoch {len(history)} of {cfg.epochs}; the run is kept in "
                             f"{checkpoint}: run the same command again to go on")
    t_train = time.perf_counter()

    # ---- calibration (float32)
    y_val = np.asarray(val_ds.targets)
    logits_val = predict_logits(model, val_ds, device, workers=eval_workers)
    del source, val_ds  # the decoded images (GBs with the tensor loader) are not needed any more
    if loader == "tensor":
        del dec, dec_val
        if device.type == "cuda":
            torch.cuda.empty_cache()
    temperature = fit_temperature(logits_val, y_val, lo=args.min_temperature)
    if temperature <= args.min_temperature * 1.01:
        log.warning("temperature hit its lower bound %.3g (validation nearly separable or the model "
                    "under-confident); kept at the bound", args.min_temperature)
    p32_raw = softmax(logits_val)
    p32 = softmax(logits_val / temperature)
    ece_raw, ece_cal = ece(p32_raw, y_val), ece(p32, y_val)
    log.info("temperature %.4f: ECE %.4f -> %.4f", temperature, ece_raw, ece_cal)

    # ---- export
    model.cpu().eval()
    fm = fuse(model)
    probe = torch.from_numpy(load_eval_array(val_s[:8], args.size))
    with torch.no_grad():
        ref = model(probe)
        diff = float((fused_forward(fm, probe) - ref).abs().max())
    if diff > 1e-3 * max(1.0, float(ref.abs().max())):
        raise RuntimeError(f"BN folding changed the logits by {diff}")
    doc = f"RxVision {args.name} {args.version}: pill classifier (int8 QDQ), trained on synthetic images only."
    f32 = build_float_model(fm, args.size, temperature, doc)

    with tempfile.TemporaryDirectory(prefix="rxv-train-") as td:
        tmp = Path(td)
        f32_path = tmp / "model_f32.onnx"
        onnx.save(f32, str(f32_path))
        sess32 = session(f32_path)
        p_onnx = run_all(sess32, probe.numpy())
        d_onnx = float(np.abs(p_onnx - softmax(ref.numpy() / temperature)).max())
        if d_onnx > 1e-4:
            raise RuntimeError(f"float ONNX export differs from torch by {d_onnx}")
        bytes32 = f32_path.stat().st_size

        # ---- quantize
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = dest.parent / f".{dest.name}.staging"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        try:
            calib_s = _calibration_subset(train_s, args.calib_images, args.seed)
            calib = load_eval_array(calib_s, args.size)
            int8 = quantize(f32_path, stage / "model.onnx", calib, tmp, len(classes), args.size, doc)
            ops = op_counts(int8)
            bytes8 = (stage / "model.onnx").stat().st_size
            sess8 = session(stage / "model.onnx")

            # ---- evaluate int8
            p8 = ort_predict(sess8, val_s, args.size)
            p8_unk_sel = ort_predict(sess8, unknown_select, args.size) if unknown_select else None
            p8_unk_rep = (p8_unk_sel if report_is_selection else
                          ort_predict(sess8, unknown_report, args.size) if unknown_report else None)
            choice = choose_thresholds(p8, y_val, p8_unk_sel, target=args.open_set_target,
                                       default=(args.min_confidence, args.min_margin))
            rate_report = choice.open_set_uncertain_rate
            if p8_unk_rep is not None and not report_is_selection:
                rate_report = float(uncertain_mask(p8_unk_rep, choice.min_confidence, choice.min_margin).mean())
            log.info("thresholds: min_confidence %.4f, min_margin %.4f (%s)", choice.min_confidence,
                     choice.min_margin, choice.method)

            groups = sorted({c.lookalike_group for c in classes if c.lookalike_group})
            group_of = np.asarray([classes[i].lookalike_group or "" for i in y_val])
            per_group_n = {g: int((group_of == g).sum()) for g in groups}
            per_group_32 = {g: _r(float((p32.argmax(1)[group_of == g] == y_val[group_of == g]).mean()))
                            if per_group_n[g] else None for g in groups}
            per_group_8 = {g: _r(float((p8.argmax(1)[group_of == g] == y_val[group_of == g]).mean()))
                           if per_group_n[g] else None for g in groups}
            top1_32, top1_8 = topk_accuracy(p32, y_val, 1), topk_accuracy(p8, y_val, 1)
            metrics = {
                "num_classes": len(classes),
                "train_n": len(train_s),
                "val_n": len(val_s),
                "epochs": len(history),
                "train_top1_last_epoch": _r(history[-1]["train_top1"]) if history else None,
                "val_top1_f32": _r(top1_32), "val_top3_f32": _r(topk_accuracy(p32, y_val, 3)),
                "val_top1_int8": _r(top1_8), "val_top3_int8": _r(topk_accuracy(p8, y_val, 3)),
                "int8_minus_f32_top1_points": round(100.0 * (top1_8 - top1_32), 2),
                "per_group_n": per_group_n,
                "per_group_top1_f32": per_group_32,
                "per_group_top1_int8": per_group_8,
                "ece_bins": 15,
                "ece_f32_uncalibrated": _r(ece_raw), "ece_f32_calibrated": _r(ece_cal),
                "ece_int8": _r(ece(p8, y_val)),
                "temperature": _r(temperature, 6),
                "open_set": {
                    "holdout_ndcs": sorted(holdout),
                    "n_select": len(unknown_select),
                    "n_report": 0 if p8_unk_rep is None else len(p8_unk_rep),
                    "report_is_selection_set": report_is_selection,
                    "uncertain_rate": _r(rate_report),
                    "uncertain_rate_selection": _r(choice.open_set_uncertain_rate),
                    "target": args.open_set_target,
                    "target_met": choice.target_met,
                },
                "in_formulary_uncertain_rate": _r(choice.in_formulary_uncertain_rate),
                "in_formulary_accepted_accuracy": _r(choice.in_formulary_accepted_accuracy),
                "in_formulary_wrong_accept_rate": _r(choice.in_formulary_wrong_accept_rate),
                "thresholds": {"min_confidence": choice.min_confidence, "min_margin": choice.min_margin,
                               "method": choice.method},
                "model_bytes_f32": int(bytes32), "model_bytes_int8": int(bytes8),
                "int8_size_ratio": _r(bytes8 / bytes32),
                "macs": int(cost.macs), "params": int(cost.params),
            }
            if metrics["open_set"]["target_met"] is False:
                log.warning("open-set target NOT met: %.1f%% of held-out-product images UNCERTAIN",
                            100 * (choice.open_set_uncertain_rate or 0))

            # ---- self-test, profile, labels, card, manifest
            st = select_selftest(stage, classes, val_s, sess8, args.size, args.seed, args.selftest_max)
            metrics["selftest_cases"] = len(st.cases)
            write_json(stage / "selftest" / "expected.json", {
                "reference": f"onnxruntime {ort.__version__}", "tolerance": SELFTEST_TOLERANCE, "cases": st.cases})
            prof = build_profile(val_s, p8, p8_unk_rep, args.synth,
                                 f"int8 model.onnx on the {len(val_s)} validation images ({val_source})")
            write_json(stage / "profile.json", prof)
            labels = labels_json(classes)
            write_json(stage / "labels.json", labels)
            argv = getattr(args, "argv", None) or sys.argv[1:]
            command = "python -m rxvision_trainer " + " ".join(shlex.quote(a) for a in argv)
            fingerprints = {str(args.data): _fingerprint(args.data)}
            if args.val_data:
                fingerprints[str(args.val_data)] = _fingerprint(args.val_data)
            thresholds = {"min_confidence": choice.min_confidence, "min_margin": choice.min_margin}
            info = {
                "name": args.name, "version": args.version, "purpose": args.purpose, "size": args.size,
                "arch": arch.describe(),
                "metrics": metrics, "thresholds": choice.as_dict(), "labels": labels,
                "calib_images": len(calib) - len(calib) % min(32, len(calib)),
                "ops": ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())),
                "data_note": args.data_note, "val_source": val_source,
                "outliers": (f"outlier exposure: weight {args.outlier_weight}, {args.outlier_fraction:.0%} of each "
                             f"batch (chimeras of two classes' halves; hue-turned saturated pills"
                             + (f"; half of them rendered impostors, {len(impostors)} images of products with one "
                                "imprint character altered" if impostors else "") + "), target uniform"
                             if args.outlier_weight > 0 else "no outlier exposure"),
                "min_temperature": args.min_temperature,
                "augment": (f"rotation +-{aug_cfg.max_rotation_deg:g} deg, 180-degree turn p={aug_cfg.p_turn180}, "
                            f"mirror p={aug_cfg.p_mirror}, shift +-{aug_cfg.max_shift:.0%}, brightness/contrast "
                            f"+-{aug_cfg.brightness:.0%}/{aug_cfg.contrast:.0%}, saturation +-{aug_cfg.saturation:.0%}"
                            + (f", tone curve gamma x/ {1 + aug_cfg.gamma:g}" if aug_cfg.gamma else "")
                            + (f", red/blue cast +-{aug_cfg.cast:.0%}" if aug_cfg.cast else "")
                            + (f", JPEG re-encoding p={aug_cfg.p_jpeg:g} at quality {aug_cfg.jpeg_quality}-"
                               f"{JPEG_QUALITY_MAX}" if aug_cfg.jpeg_quality else "")),
                "data_fingerprints": ", ".join(f"`{k}` {v}" for k, v in fingerprints.items()),
                "command": command, "seed": args.seed, "device": str(device),
                "lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                "torch": torch.__version__, "selftest_cases": len(st.cases),
                "selftest_skipped": (f" No stable image was found for {len(st.skipped)} class(es): "
                                     f"{', '.join(st.skipped)}." if st.skipped else ""),
                "profile_features_note": prof["features"]["note"],
            }
            (stage / "MODEL_CARD.md").write_text(model_card(info), encoding="utf-8")
            manifest = {
                "schema_version": 1,
                "name": args.name,
                "version": args.version,
                "purpose": args.purpose,
                "created": _created(args.created),
                "description": (f"{args.name} {args.version}: "
                                + ("TEST FIXTURE (for tests and demos, not for real medication): "
                                   if args.purpose == "fixture" else "")
                                + f"{len(classes)}-product pill classifier, plain 3x3 CNN, int8 QDQ; trained and "
                                  f"measured on synthetic images only."),
                "model": "model.onnx",
                "labels": "labels.json",
                "profile": "profile.json",
                "num_classes": len(classes),
                "input": input_spec(args.size, args.crop, getattr(args, "crop_margin", None)),
                "output": {"name": "probs", "kind": "probabilities"},
                "thresholds": thresholds,
                "selftest": {"expected": "selftest/expected.json", "tolerance": SELFTEST_TOLERANCE},
                "provenance": {
                    "generator": f"models/trainer (rxvision-trainer {__version__})",
                    "command": command,
                    "seed": args.seed,
                    "device": str(device),
                    "loader": loader,
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                    "onnxruntime": ort.__version__,
                    "architecture": arch.describe(),
                    "quantization": "onnxruntime quantize_static QDQ, per-channel int8 weights, uint8 activations, "
                                    "MinMax on training images; logits and Softmax float; BN folded",
                    "training_data": args.data_note,
                    "data_fingerprints": fingerprints,
                    "holdout_ndcs": sorted(holdout),
                    "epochs_requested": args.epochs,
                    "epochs_trained": len(history),
                    "time_budget_s": args.time_budget or None,
                    # per-epoch statistics without the wall-clock times, so a rerun is byte-identical
                    "history": [{k: _r(v, 6) if isinstance(v, float) else v for k, v in h.items() if k != "seconds"}
                                for h in history],
                },
                "metrics": metrics,
            }
            finalize(stage, manifest)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        if dest.exists():
            shutil.rmtree(dest)
        stage.rename(dest)
        if args.artifacts:
            args.artifacts.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f32_path, args.artifacts / "model_f32.onnx")
            torch.save({"state_dict": model.state_dict(), "arch": asdict(arch), "classes": [c.ndc for c in classes],
                        "temperature": temperature, "size": args.size}, args.artifacts / "checkpoint.pt")
            write_json(args.artifacts / "history.json", history)

    check = verify_bundle(dest)
    log.info("bundle %s verified: %d self-test cases, max |diff| %.2g", dest, check["cases"], check["max_abs_diff"])
    summary = {
        "bundle": str(dest), "seconds_total": round(time.perf_counter() - t_start, 1),
        "seconds_training": round(t_train - t_start, 1), "seconds_data_preparation": round(t_data, 1),
        "loader": loader, "selftest_ort": check,
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
        "thresholds": thresholds, "open_set": metrics["open_set"],
    }
    if not args.no_mlflow:
        log_mlflow(args, metrics, dest)
    return summary


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and np.isfinite(v):
            out[key] = float(v)
    return out


def log_mlflow(args: argparse.Namespace, metrics: dict, bundle: Path) -> None:
    """Logs the run when mlflow is importable; never required."""
    try:
        import mlflow  # type: ignore
    except ImportError:
        log.info("mlflow not installed: run not logged")
        return
    try:
        with mlflow.start_run(run_name=f"{args.name}-{args.version}"):
            mlflow.log_params({k: str(v) for k, v in vars(args).items() if v is not None and k not in ("func", "argv")})
            mlflow.log_metrics(_flat(metrics))
            mlflow.log_artifacts(str(bundle), artifact_path="bundle")
            if args.artifacts and args.artifacts.is_dir():
                mlflow.log_artifacts(str(args.artifacts), artifact_path="artifacts")
        log.info("logged to mlflow (%s)", mlflow.get_tracking_uri())
    except Exception as e:  # logging must never fail a training run
        log.warning("mlflow logging failed: %s", e)


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, ensure_ascii=False)
