"""Data-preparation throughput: the Pillow loader (``--loader pil``) vs the tensor path (``--loader tensor``).

    python -m rxvision_trainer.bench_data --data DIR [--size 160] [--device cpu|cuda|auto] [--workers N]
        [--batch-size 64] [--pil-images 1024] [--epochs 2] [--threads N] [--skip-pil] [--skip-cache]

Measures, without any model: the Pillow path's training batches per second
(decode + ``Augment`` + reference preprocessing per image in ``--workers``
DataLoader workers, plus the outlier batches, as ``train`` consumes them); the
tensor path's one-off decode (``--workers`` processes, cache off), the cache
write and read, and its augmented batches per second on ``--device`` (outliers
included). Prints one JSON line; images/s count training images (each batch
also carries 25 % outliers, made by both paths).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .data import Augment, AugmentConfig, ImageDataset, OutlierDataset, read_dataset
from .tensordata import CACHE_DIR, TensorAugment, TensorTrainSource, default_decode_workers, load_decoded
from .train import LoaderSource, TrainConfig, default_workers, outlier_batch_size, resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_pil(samples, class_of, size, cfg: TrainConfig, device, max_images: int) -> dict:
    ds = ImageDataset(samples, class_of, size, Augment(AugmentConfig()), seed=cfg.seed)
    oe = OutlierDataset(samples, class_of, size, Augment(AugmentConfig()), seed=cfg.seed)
    src = LoaderSource(ds, oe, cfg, device)
    n, t0 = 0, time.perf_counter()
    for x, y, x_out, _imitated in src.epoch(0):
        n += len(y)
        if n >= max_images:
            break
    _sync(device)
    dt = time.perf_counter() - t0
    return {"workers": src.workers, "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 1)}


def bench_tensor(root: Path, samples, class_of, size, cfg: TrainConfig, device, workers: int, epochs: int,
                 skip_cache: bool = False) -> dict:
    cache_dir = root / CACHE_DIR
    had_cache = cache_dir.exists()
    t0 = time.perf_counter()
    dec = load_decoded(root, samples, size, workers=workers, cache=False)
    t_decode = time.perf_counter() - t0
    out = {"decode_workers": workers, "decode_images": len(samples), "decode_seconds": round(t_decode, 2),
           "decode_images_per_s": round(len(samples) / t_decode, 1)}
    if not had_cache and not skip_cache:  # cache write + read, then leave the dataset as it was
        t0 = time.perf_counter()
        load_decoded(root, samples, size, workers=workers, cache=True)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = load_decoded(root, samples, size, workers=workers, cache=True)
        t_read = time.perf_counter() - t0
        assert again.source == "cache" and torch.equal(again.images, dec.images)
        shutil.rmtree(cache_dir, ignore_errors=True)
        out.update({"decode_and_cache_write_seconds": round(t_write, 2), "cache_read_seconds": round(t_read, 2)})
    t0 = time.perf_counter()
    dec = dec.to(device)
    _sync(device)
    out["to_device_seconds"] = round(time.perf_counter() - t0, 2)
    src = TensorTrainSource(dec, samples, class_of, TensorAugment(AugmentConfig()), cfg.seed, cfg.batch_size,
                            device, outlier_batch=outlier_batch_size(cfg))
    per_epoch = []
    for e in range(epochs):  # the first epoch includes warm-up (kernel selection, allocator)
        n, t0 = 0, time.perf_counter()
        for x, y, x_out, _imitated in src.epoch(e):
            n += len(y)
        _sync(device)
        per_epoch.append(time.perf_counter() - t0)
    best = min(per_epoch)
    out.update({"augment_device": str(device), "augment_epoch_seconds": [round(t, 3) for t in per_epoch],
                "augment_images_per_s": round(len(samples) / best, 1)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset directory (labels.csv layout)")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--workers", type=int, default=-1,
                    help="DataLoader workers (pil) and decoding processes (tensor); default: each path's default")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pil-images", type=int, default=1024, help="training images the Pillow path is timed on")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of tensor augmentation timed (best counts)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-pil", action="store_true", help="time the tensor path only")
    ap.add_argument("--skip-cache", action="store_true", help="do not time the decode cache's write and read")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    samples = read_dataset(args.data)
    class_of = {n: i for i, n in enumerate(sorted({s.ndc for s in samples}))}
    cfg = TrainConfig(batch_size=args.batch_size, workers=args.workers, seed=1)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = {"data": str(args.data), "n": len(samples), "size": args.size, "device": str(device),
           "cpus": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads()}
    if not args.skip_pil:
        res["pil"] = bench_pil(samples, class_of, args.size, cfg, device, args.pil_images)
    workers = default_decode_workers() if args.workers < 1 else args.workers
    res["tensor"] = bench_tensor(args.data, samples, class_of, args.size, cfg, device, workers, args.epochs,
                                 args.skip_cache)
    if "pil" in res:
        # data preparation per epoch of this dataset: Pillow per epoch vs tensor decode once + augment per epoch
        t = res["tensor"]
        res["per_epoch_seconds"] = {"pil": round(len(samples) / res["pil"]["images_per_s"], 2),
                                    "tensor_augment": round(len(samples) / t["augment_images_per_s"], 3),
                                    "tensor_decode_once": t["decode_seconds"]}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
