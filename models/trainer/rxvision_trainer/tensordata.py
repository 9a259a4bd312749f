"""Training data as tensors: decode every image once, augment whole batches on the training device.

The Pillow path (``--loader pil``: ``data.ImageDataset`` / ``data.OutlierDataset``
in DataLoader workers) decodes a JPEG and runs Pillow's rotate and three
enhancers for every image of every epoch; on a 16-core H100 host that took
~25 s per epoch for 23,100 images while the GPU needs 2-3 s. This module is the
default path (``--loader tensor``):

- **Decode once.** Every row of a dataset's ``labels.csv`` is decoded by a
  process pool (``--workers`` processes) into one uint8 tensor
  ``(N, 3, S, S)`` at the *training size* S, with exactly the reference resize
  (``data.decode_for_training``: Pillow 12 bilinear, what ``preprocess_pil``
  does), plus each image's border fill colour measured at full resolution (what
  ``Augment`` fills rotated corners with). 23,100 images at 160 px are 1.8 GB,
  kept on the GPU when it has room (else in host memory).
- **Why S and not a larger pre-size (176/192/224 px).** Storing the reference
  resize itself makes an un-augmented training image *bit-identical* to the
  evaluation input (the same uint8 pixels, the same float arithmetic), so the
  validation pass during training and the temperature fit can read the same
  tensors, and the store is half the size of a 224 px one. The price: rotation
  and shift are resampled at S instead of at the render size before the
  downscale, i.e. slightly more interpolation blur on rotated images (a
  bilinear warp at 160 px instead of 224 px); the augmentation's shift fills
  the uncovered border with the fill colour either way, so no margin is needed.
- **Disk cache.** The decoded arrays are saved next to the dataset
  (``DATASET/.rxv-decoded/decoded-<S>px-<key>.npz``, key = SHA-256 of
  labels.csv, every listed file's size and mtime, S, the Pillow version and
  the format version); a rerun loads it instead of decoding. One file per size
  is kept (a new key replaces the old); ``--no-decode-cache`` turns it off; an
  unwritable dataset folder only logs a warning.
- **Augment on the device** (``TensorAugment``): the parameters of ``Augment``
  drawn per image from NumPy generators seeded by (seed, epoch, batch), so a
  run is the same on any device and worker count; the warp is one
  ``affine_grid``/``grid_sample`` (bilinear) per batch with the fill colour
  outside the image, then brightness, contrast and saturation with Pillow's
  ``ImageEnhance`` formulas (luma 0.299/0.587/0.114), clamped to [0, 255] after
  each, rounded to whole levels once at the end (Pillow truncates after each
  step), then normalised with the reference arithmetic. With every jitter set
  to zero the result equals the reference preprocessing exactly (tested).
- **Outliers** (``TensorTrainSource._outliers``): the same recipe as
  ``OutlierDataset`` - hue-turned saturated pills, two-class chimeras and, when
  the dataset has them, rendered impostors - made from the same store, batched.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import JPEG_QUALITY_MAX, LABELS_CSV, AugmentConfig, OutlierDataset, Sample, camera_draw, decode_chunk
from .imprint import UNKNOWN
from .preprocess import MEAN, SCALE, STD

log = logging.getLogger("rxvision_trainer")

CACHE_FORMAT = 1
CACHE_DIR = ".rxv-decoded"
DECODE_CHUNK = 64  # images per process-pool task

# NumPy seed streams: [seed, STREAM, epoch, (batch)]
STREAM_ORDER, STREAM_AUG, STREAM_OE_ORDER, STREAM_OE = 101, 102, 103, 104


def default_decode_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


# --------------------------------------------------------------------------- decoding and the cache
@dataclass
class Decoded:
    """A dataset decoded at one size: rows in ``labels.csv`` order."""

    images: torch.Tensor  # (N, 3, S, S) uint8: the reference resize of each image
    fill: torch.Tensor    # (N, 3) uint8: border median colour of the full-resolution image
    row_of: dict          # labels.csv ``file`` -> row
    size: int
    source: str = "decoded"  # or "cache"

    def rows(self, samples: Sequence[Sample]) -> torch.Tensor:
        try:
            idx = [self.row_of[s.file] for s in samples]
        except KeyError as e:
            raise ValueError(f"{e.args[0]} is not an image of this decoded dataset") from None
        return torch.tensor(idx, dtype=torch.long, device=self.images.device)

    @property
    def nbytes(self) -> int:
        return self.images.numel() + self.fill.numel()

    def to(self, device: torch.device) -> "Decoded":
        """Moves the store to ``device``; on CUDA only if it takes under half the free memory (else pinned host)."""
        device = torch.device(device)
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            if self.nbytes < 0.5 * free:
                return Decoded(self.images.to(device), self.fill.to(device), self.row_of, self.size, self.source)
            log.warning("decoded images (%.1f GB) stay in host memory: %.1f GB free on %s", self.nbytes / 1e9,
                        free / 1e9, device)
            return Decoded(self.images.pin_memory(), self.fill.pin_memory(), self.row_of, self.size, self.source)
        return self


def cache_key(root: Path, samples: Sequence[Sample], size: int) -> str:
    import PIL

    h = hashlib.sha256(f"rxvision decoded v{CACHE_FORMAT} {size}px pillow {PIL.__version__}\n".encode())
    h.update((Path(root) / LABELS_CSV).read_bytes())
    for s in samples:
        st = s.path.stat()
        h.update(f"{s.file}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _pool_context():
    import multiprocessing as mp

    # fork, like torch's DataLoader: the children only run Pillow and NumPy (never torch or CUDA), and
    # forkserver/spawn would re-import the caller's __main__, which fails for unguarded scripts
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def decode_paths(paths: Sequence[Path], size: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, S, S) and (N, 3) uint8 for the files, in order; ``workers`` > 1 uses a process pool."""
    n = len(paths)
    images = np.empty((n, 3, size, size), np.uint8)
    fills = np.empty((n, 3), np.uint8)
    jobs = [([str(p) for p in paths[i:i + DECODE_CHUNK]], size) for i in range(0, n, DECODE_CHUNK)]

    def put(i: int, res) -> None:
        imgs, f = res
        images[i * DECODE_CHUNK: i * DECODE_CHUNK + len(imgs)] = imgs.transpose(0, 3, 1, 2)
        fills[i * DECODE_CHUNK: i * DECODE_CHUNK + len(f)] = f

    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            put(i, decode_chunk(job))
    else:
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process with threads (torch's); see _pool_context
            warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks",
                                    category=DeprecationWarning)
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_pool_context()) as ex:
                for i, res in enumerate(ex.map(decode_chunk, jobs)):
                    put(i, res)
    return images, fills


def load_decoded(root: str | Path, samples: Sequence[Sample], size: int, workers: int | None = None,
                 cache: bool = True) -> Decoded:
    """Every sample of the dataset at ``root`` (normally all of ``read_dataset(root)``) at ``size``."""
    root = Path(root)
    workers = default_decode_workers() if workers is None or workers < 1 else workers
    row_of = {s.file: i for i, s in enumerate(samples)}
    t0 = time.perf_counter()
    path = None
    if cache:
        key = cache_key(root, samples, size)
        path = root / CACHE_DIR / f"decoded-{size}px-{key}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    images, fills = z["images"], z["fill"]
                if images.shape == (len(samples), 3, size, size) and fills.shape == (len(samples), 3):
                    log.info("%s: %d decoded images from the cache %s (%.1f s)", root, len(samples), path.name,
                             time.perf_counter() - t0)
                    return Decoded(torch.from_numpy(images), torch.from_numpy(fills), row_of, size, "cache")
                log.warning("%s: shape mismatch, decoding again", path)
            except (OSError, ValueError, KeyError) as e:
                log.warning("%s: unreadable (%s), decoding again", path, e)
    images, fills = decode_paths([s.path for s in samples], size, workers)
    dt = time.perf_counter() - t0
    log.info("%s: decoded %d images to %dx%d in %.1f s (%.0f images/s, %d process%s)", root, len(samples), size,
             size, dt, len(samples) / max(dt, 1e-9), workers, "" if workers == 1 else "es")
    if path is not None:
        _write_cache(path, images, fills)
    return Decoded(torch.from_numpy(images), torch.from_numpy(fills), row_of, size, "decoded")


def _write_cache(path: Path, images: np.ndarray, fills: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, images=images, fill=fills)
        os.replace(tmp, path)
        prefix = path.name.rsplit("-", 1)[0]  # decoded-<S>px: one cache per size
        for old in path.parent.glob(prefix + "-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
        log.info("decoded images cached in %s (%.2f GB)", path, path.stat().st_size / 1e9)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        log.warning("could not write the decode cache %s: %s (training goes on)", path, e)


# --------------------------------------------------------------------------- normalisation and augmentation
_NORM: dict = {}


def normalise(x: torch.Tensor) -> torch.Tensor:
    """float32 pixel levels (B, 3, H, W) -> the model input, with ``preprocess_pil``'s float32 arithmetic."""
    dev = x.device
    if dev not in _NORM:
        _NORM[dev] = (torch.tensor(SCALE, dtype=torch.float32, device=dev),
                      torch.tensor(MEAN, dtype=torch.float32, device=dev).view(1, 3, 1, 1),
                      torch.tensor(STD, dtype=torch.float32, device=dev).view(1, 3, 1, 1))
    scale, mean, std = _NORM[dev]
    return (x.float() * scale - mean) / std


@dataclass
class AugParams:
    """One value per image (NumPy arrays); ``angle`` in degrees counter-clockwise, 180-degree turn included;
    ``dx``/``dy`` as fractions of the image size (positive: right/down)."""

    mirror: np.ndarray
    angle: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    gamma: np.ndarray | None = None   # tone curve exponent (None: 1)
    gain_r: np.ndarray | None = None  # white-balance cast (None: 1)
    gain_b: np.ndarray | None = None
    quality: np.ndarray | None = None  # JPEG re-encoding quality (None or 0: none)

    def as_tensor(self, device: torch.device | None = None) -> torch.Tensor:
        """(n, 11) float64, the columns in field order (what ``TensorAugment`` slices per batch)."""
        ones = np.ones(len(self.mirror))
        cols = [self.mirror, self.angle, self.dx, self.dy, self.brightness, self.contrast, self.saturation,
                *(ones if v is None else v for v in (self.gamma, self.gain_r, self.gain_b)),
                np.zeros(len(self.mirror)) if self.quality is None else self.quality]
        t = torch.from_numpy(np.stack([np.asarray(c, np.float64) for c in cols], axis=1))
        return t if device is None else t.to(device)


def _luma(x: torch.Tensor) -> torch.Tensor:
    # Pillow's RGB -> L weights (ITU-R 601-2)
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


class TensorAugment:
    """``data.Augment`` for a batch of stored images, on whatever device they are on."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()

    def draw(self, n: int, rng: np.random.Generator) -> AugParams:
        c = self.cfg
        mirror = rng.random(n) < c.p_mirror
        angle = rng.uniform(-c.max_rotation_deg, c.max_rotation_deg, n)
        angle = angle + 180.0 * (rng.random(n) < c.p_turn180)
        dx = rng.uniform(-c.max_shift, c.max_shift, n)
        dy = rng.uniform(-c.max_shift, c.max_shift, n)
        factors = [rng.uniform(1.0 - a, 1.0 + a, n) for a in (c.brightness, c.contrast, c.saturation)]
        params = AugParams(mirror, angle, dx, dy, *factors)
        if c.gamma > 0 or c.cast > 0:  # drawn last, per image in data.camera_draw's order
            drawn = [camera_draw(c, rng) for _ in range(n)]
            params.gamma = np.asarray([g for g, _ in drawn])
            params.gain_r = np.asarray([k[0] for _, k in drawn])
            params.gain_b = np.asarray([k[2] for _, k in drawn])
        if c.jpeg_quality > 0:  # drawn after the camera's cast and tone curve, as applied
            on = rng.random(n) < c.p_jpeg
            params.quality = np.where(on, rng.integers(c.jpeg_quality, JPEG_QUALITY_MAX + 1, n), 0)
        return params

    @staticmethod
    def theta(p: torch.Tensor) -> torch.Tensor:
        """(B, 2, 3) float32 from (B, 7) parameters: output -> input in ``affine_grid``'s normalised coordinates.

        Pillow's ``rotate(angle, translate=(dx, dy))`` samples input = R (output - centre - t) + centre with
        R = [[cos, -sin], [sin, cos]] in pixel coordinates (y down); a mirror applied before it negates the
        input's x. For a square image the normalised form is the same with t scaled to 2 * (dx, dy).
        """
        p = p.double()
        a = torch.deg2rad(p[:, 1])
        cos, sin = torch.cos(a), torch.sin(a)
        m = 1.0 - 2.0 * p[:, 0]
        tx, ty = 2.0 * p[:, 2], 2.0 * p[:, 3]
        r00, r01, r10, r11 = m * cos, -m * sin, sin, cos
        row0 = torch.stack([r00, r01, -(r00 * tx + r01 * ty)], dim=1)
        row1 = torch.stack([r10, r11, -(r10 * tx + r11 * ty)], dim=1)
        return torch.stack([row0, row1], dim=1).float()

    def __call__(self, x: torch.Tensor, fill: torch.Tensor, p: AugParams | torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S), fill (B, 3) and parameters -> float32 (B, 3, S, S) of whole levels in [0, 255]."""
        c = self.cfg
        b, _, h, w = x.shape
        dev = x.device
        p = (p.as_tensor() if isinstance(p, AugParams) else p).to(dev)
        x = x.float()
        f = fill.to(dev).float().view(b, 3, 1, 1)
        grid = F.affine_grid(self.theta(p), [b, 3, h, w], align_corners=False)
        # zeros outside the image after subtracting the fill = the fill colour there, blended at the edge
        x = F.grid_sample(x - f, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + f
        factors = p[:, 4:7].float().view(b, 3, 1, 1, 1)
        if c.brightness > 0:  # blend with black
            x = (x * factors[:, 0]).clamp_(0.0, 255.0)
        if c.contrast > 0:  # blend with the mean grey level, rounded as Pillow does
            mean = torch.floor(_luma(x).mean(dim=(1, 2)) + 0.5).view(b, 1, 1, 1)
            x = (mean + factors[:, 1] * (x - mean)).clamp_(0.0, 255.0)
        if c.saturation > 0:  # blend with the grey version
            grey = _luma(x).unsqueeze(1)
            x = (grey + factors[:, 2] * (x - grey)).clamp_(0.0, 255.0)
        if c.gamma > 0 or c.cast > 0:  # data.camera_lut: the cast, then the tone curve
            x = x.round_()  # Pillow's point table takes whole levels
            gains = torch.stack([p[:, 8], torch.ones_like(p[:, 8]), p[:, 9]], dim=1).float().view(b, 3, 1, 1)
            x = 255.0 * ((x * gains).clamp_(0.0, 255.0) / 255.0) ** p[:, 7].float().view(b, 1, 1, 1)
        if c.jpeg_quality > 0:
            x = x.round_().clamp_(0.0, 255.0)  # an encoder takes whole levels
            sel = torch.nonzero(p[:, 10] > 0).flatten()
            if len(sel):
                x[sel] = jpeg_lossy(x[sel], p[sel, 10])
        return x.round_().clamp_(0.0, 255.0)


# JPEG's example quantisation tables (ITU-T T.81 Annex K), scaled by quality as libjpeg's
# jpeg_set_quality does (what Pillow's ``quality`` sets).
_JPEG_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
              14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
              18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
              49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_JPEG_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
                24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99) + (99,) * 32


def jpeg_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 8, 8) luma and chroma quantisation steps for qualities (B,) in 1..100."""
    q = quality.double().clamp(1, 100).view(-1, 1)
    scale = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    out = []
    for base in (_JPEG_LUMA, _JPEG_CHROMA):
        t = torch.tensor(base, dtype=torch.float64, device=q.device).view(1, 64)
        out.append(torch.floor((t * scale + 50.0) / 100.0).clamp(1, 255).float().view(-1, 8, 8))
    return out[0], out[1]


@functools.lru_cache(maxsize=None)
def _dct2_matrix(device: torch.device) -> torch.Tensor:
    """(64, 64): the orthonormal 8x8 DCT-II of a row-major block as one product, kron(D, D); made
    once per device (every augmented batch uses it three times), never written to."""
    k = torch.arange(8, dtype=torch.float64, device=device).view(8, 1)
    n = torch.arange(8, dtype=torch.float64, device=device).view(1, 8)
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return torch.kron(d, d).float()


def _quantise_blocks(plane: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """A level-shifted plane (B, H, W), H and W multiples of 8, through the 8x8 DCT, rounding to
    multiples of ``step`` (B, 8, 8) and the inverse DCT."""
    b, h, w = plane.shape
    d = _dct2_matrix(plane.device)
    blocks = plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(b, -1, 64)
    coef = blocks @ d.T
    s = step.reshape(b, 1, 64)
    coef = torch.round(coef / s) * s
    return (coef @ d).reshape(b, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(b, h, w)


def jpeg_lossy(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Float levels (B, 3, H, W) after JPEG's lossy steps at ``quality`` (B,), as a baseline encoder
    with 4:2:0 subsampling and a decoder with libjpeg's smooth upsampling make them: JFIF YCbCr, chroma
    averaged over 2x2, 8x8 DCT quantised with the quality-scaled Annex K tables, back. The entropy
    coding between is lossless, so it is left out. Edges are padded to whole 16x16 units by repeating
    the last row and column, as encoders do."""
    x = x.float()
    b, _, h, w = x.shape
    ph, pw = -h % 16, -w % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    r, g, bl = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl + 128.0
    luma_step, chroma_step = jpeg_tables(quality.to(x.device))
    y = _quantise_blocks(y - 128.0, luma_step) + 128.0
    chroma = F.avg_pool2d(torch.stack([cb, cr], dim=1), 2)  # (B, 2, H/2, W/2)
    hh, ww = chroma.shape[-2:]
    chroma = torch.stack([_quantise_blocks(chroma[:, i] - 128.0, chroma_step) + 128.0 for i in range(2)], dim=1)
    chroma = F.interpolate(chroma.clamp(0.0, 255.0), size=(2 * hh, 2 * ww), mode="bilinear", align_corners=False)
    y = y.clamp(0.0, 255.0)
    cb, cr = chroma[:, 0] - 128.0, chroma[:, 1] - 128.0
    out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    return out[:, :, :h, :w].round().clamp(0.0, 255.0)


def hue_turn(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Turns the HSV hue of float levels (B, 3, H, W) by ``turn`` (B,) of a full turn; S and V kept."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.amax(dim=1)
    d = v - x.amin(dim=1)
    s = torch.where(v > 0, d / v.clamp(min=1e-6), torch.zeros_like(v))
    dd = d.clamp(min=1e-6)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2.0 + (b - r) / dd, 4.0 + (r - g) / dd))
    h = torch.where(d > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + turn.view(-1, 1, 1), 1.0) * 6.0
    i = torch.floor(h)
    fr = h - i
    i = i.long() % 6
    p_ = v * (1.0 - s)
    q = v * (1.0 - s * fr)
    t = v * (1.0 - s * (1.0 - fr))
    rr = torch.stack([v, q, p_, p_, t, v], 1).gather(1, i.unsqueeze(1))
    gg = torch.stack([t, v, v, q, p_, p_], 1).gather(1, i.unsqueeze(1))
    bb = torch.stack([p_, p_, t, v, v, q], 1).gather(1, i.unsqueeze(1))
    return torch.cat([rr, gg, bb], 1).round_().clamp_(0.0, 255.0)


def centre_saturation(x: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (0-255, Pillow's scale) of the central half of each image: (B,)."""
    h, w = x.shape[2:]
    c = x[:, :, h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    v = c.amax(dim=1)
    s = torch.where(v > 0, (v - c.amin(dim=1)) * 255.0 / v.clamp(min=1e-6), torch.zeros_like(v))
    return s.mean(dim=(1, 2))


# --------------------------------------------------------------------------- sources for train.train
class TensorTrainSource:
    """Shuffled, augmented training batches (with outlier batches) from a ``Decoded`` store.

    ``epoch(e)`` yields ``(x, y, x_out, imitated)`` on ``device``: normalised
    float32 inputs, class indices, ``outlier_batch`` synthetic unknown pills
    and the class each of them imitates (-1 unless it is a rendered impostor
    of a class of the model; both None when outliers are off, or once the
    epoch's outlier order is used up, as the Pillow path does). Every random
    choice of an epoch is drawn up front on the host from NumPy generators
    seeded by (seed, stream, epoch) and sent to the device in one copy, so a
    run is the same on any device and the loop never waits for the host.

    With ``bags`` (the bag of imprint characters of every sample and of every
    impostor, ``imprint.bags``) ``epoch(e)`` yields two more: the bags of the
    batch and of its outliers (``imprint.UNKNOWN`` rows for outliers that are
    not rendered impostors). Nothing else changes: the same images, in the
    same order, with the same augmentation.
    """

    def __init__(self, decoded: Decoded, samples: Sequence[Sample], class_of: dict[str, int],
                 augment: TensorAugment, seed: int, batch_size: int, device: torch.device,
                 outlier_batch: int = 0, p_hue: float = 0.4, impostors: Sequence[Sample] = (),
                 p_impostor: float = 0.5, bags: tuple[np.ndarray, np.ndarray] | None = None):
        self.store, self.augment, self.seed = decoded, augment, seed
        self.batch_size, self.outlier_batch, self.p_hue = batch_size, outlier_batch, p_hue
        self.device = torch.device(device)
        self.rows = decoded.rows(samples)
        # rendered impostors (OutlierDataset's third kind): store rows, drawn for a share p_impostor of the slots
        self.impostor_rows = decoded.rows(impostors) if impostors else None
        # the class each impostor imitates (-1 when the model has no such class), for the "away" loss
        self.impostor_targets = (torch.tensor([class_of.get(s.imitates, -1) for s in impostors], dtype=torch.int64,
                                              device=self.device) if impostors else None)
        self.p_impostor = p_impostor
        self.bags = self.impostor_bags = None
        if bags is not None:
            own, theirs = bags
            if len(own) != len(samples) or len(theirs) != len(impostors):
                raise ValueError(f"{len(own)} and {len(theirs)} bags for {len(samples)} samples and "
                                 f"{len(impostors)} impostors")
            self.bags = torch.from_numpy(np.asarray(own, np.int64)).to(self.device)
            self.impostor_bags = torch.from_numpy(np.asarray(theirs, np.int64)).to(self.device)
        t = np.asarray([class_of[s.ndc] for s in samples], np.int64)
        self.targets_np = t
        self.targets = torch.from_numpy(t).to(self.device)
        self.n = len(samples)
        self.classes = np.unique(t)
        # positions grouped by class: members[start[k]:start[k] + count[k]] are class classes[k]
        self.members = np.argsort(t, kind="stable")
        self.count = np.asarray([(t == c).sum() for c in self.classes])
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])

    def __len__(self) -> int:
        return max(1, math.ceil(self.n / self.batch_size))

    def _images(self, pos: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augmented pixel levels (float32, whole numbers 0-255) of the samples at ``pos`` (device tensor)."""
        return self._rows(self.rows[pos.to(self.rows.device)], params)

    def _rows(self, rows: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Augmented pixel levels of the store's ``rows``."""
        x, f = self.store.images[rows], self.store.fill[rows]
        if x.device != self.device:
            x, f = x.to(self.device, non_blocking=True), f.to(self.device, non_blocking=True)
        return self.augment(x, f, params)

    def _plan_outliers(self, pos: np.ndarray, rng: np.random.Generator) -> dict:
        """``OutlierDataset``'s choices for the outlier slots ``pos``: hue turn or chimera partner and cut."""
        k = len(pos)
        plan = {"pos": pos, "a": self.augment.draw(k, rng).as_tensor()}
        try_hue = rng.random(k) < self.p_hue
        turn = rng.integers(64, 193, k) / 256.0
        if len(self.classes) >= 2:
            # another class, uniformly: draw among the other classes (skip the own one), then one of its images
            own_k = np.searchsorted(self.classes, self.targets_np[pos])
            r = rng.integers(0, len(self.classes) - 1, k)
            other_k = r + (r >= own_k)
            partner = self.members[self.start[other_k] + (rng.random(k) * self.count[other_k]).astype(np.int64)]
            plan.update(partner=partner, b=self.augment.draw(k, rng).as_tensor())
            cut = np.round(self.store.size * rng.uniform(0.35, 0.65, k))
            across = rng.random(k) < 0.5  # cut the width (columns from the partner) or the height
            plan["cut"] = np.stack([cut, across], axis=1)
        plan["hue"] = np.stack([try_hue, turn], axis=1)
        if self.impostor_rows is not None:  # drawn last: a dataset without impostors plans as before
            which = rng.integers(0, len(self.impostor_rows), k)
            plan["impostor"] = np.stack([rng.random(k) < self.p_impostor, which], axis=1)
            plan["c"] = self.augment.draw(k, rng).as_tensor()
        return plan

    def _outliers(self, plan: dict, sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The outlier images of the plan's slots ``sl``, the class each imitates (-1: none) and, with bags,
        their bags (``UNKNOWN`` rows but for the rendered impostors)."""
        pos = plan["pos"][sl]
        k = len(pos)
        a = self._images(pos, plan["a"][sl])
        if "partner" in plan:
            bimg = self._images(plan["partner"][sl], plan["b"][sl])
            s = a.shape[-1]
            cut, across = plan["cut"][sl, 0].view(k, 1), plan["cut"][sl, 1].bool().view(k, 1, 1, 1)
            m = torch.arange(s, device=a.device).view(1, s) >= cut  # (k, S)
            mask = torch.where(across, m.view(k, 1, 1, s), m.view(k, 1, s, 1))
            other = torch.where(mask, bimg, a)
        else:
            other = a
        hue = hue_turn(a, plan["hue"][sl, 1].float())
        use_hue = plan["hue"][sl, 0].bool() & (centre_saturation(a) >= OutlierDataset.MIN_SATURATION)
        out = torch.where(use_hue.view(k, 1, 1, 1), hue, other)
        imitated = torch.full((k,), -1, dtype=torch.int64, device=out.device)
        bag = None
        if self.bags is not None:
            bag = torch.full((k, self.bags.shape[1]), UNKNOWN, dtype=torch.int64, device=out.device)
        if "impostor" in plan:
            use, which = plan["impostor"][sl, 0].bool(), plan["impostor"][sl, 1].long()
            rows = self.impostor_rows[which.to(self.impostor_rows.device)]
            out = torch.where(use.view(k, 1, 1, 1), self._rows(rows, plan["c"][sl]), out)
            imitated = torch.where(use, self.impostor_targets[which], imitated)
            if bag is not None:
                bag = torch.where(use.view(k, 1), self.impostor_bags[which], bag)
        return normalise(out), imitated, bag

    def epoch(self, epoch: int) -> Iterator[tuple]:
        dev = self.device
        order = np.random.default_rng([self.seed, STREAM_ORDER, epoch]).permutation(self.n)
        params = self.augment.draw(self.n, np.random.default_rng([self.seed, STREAM_AUG, epoch]))
        order_t = torch.from_numpy(order).to(dev)
        params_t = params.as_tensor(dev)
        bs, ob = self.batch_size, self.outlier_batch
        n_out = min(self.n, len(self) * ob)
        plan = None
        if n_out:
            oe_order = np.random.default_rng([self.seed, STREAM_OE_ORDER, epoch]).permutation(self.n)[:n_out]
            host = self._plan_outliers(oe_order, np.random.default_rng([self.seed, STREAM_OE, epoch]))
            plan = {k: (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v).to(dev)
                    for k, v in host.items()}
        for b in range(len(self)):
            sl = slice(b * bs, min((b + 1) * bs, self.n))
            pos = order_t[sl]
            x = normalise(self._images(pos, params_t[sl]))
            y = self.targets[pos]
            x_out = imitated = bag_out = None
            if plan is not None and b * ob < n_out:
                x_out, imitated, bag_out = self._outliers(plan, slice(b * ob, min((b + 1) * ob, n_out)))
            if self.bags is None:
                yield x, y, x_out, imitated
            else:
                yield x, y, x_out, imitated, self.bags[pos], bag_out


class TensorEvalSet:
    """Un-augmented images of a ``Decoded`` store: exactly the reference preprocessing, batched."""

    def __init__(self, decoded: Decoded, samples: Sequence[Sample], class_of: dict[str, int],
                 device: torch.device):
        self.store, self.device = decoded, torch.device(device)
        self.rows = decoded.rows(samples)
        self.targets = [class_of[s.ndc] for s in samples]

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.rows), batch_size):
            x = self.store.images[self.rows[i:i + batch_size]]
            yield normalise(x.to(self.device, non_blocking=True))
