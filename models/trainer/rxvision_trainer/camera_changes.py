"""Camera changes the renderer does not make itself, applied to a dataset's whole frames.

Issue 17's robustness target: top-1 >= 0.95 on the frames the counter analyses
after changes of the camera that ``rxvision-synth`` never renders. Each change
here is a fixed, deterministic Pillow operation on the rendered JPEG frames
(an independent implementation: Pillow, not our renderer or decoder), written
as a new dataset with the same ``labels.csv``:

- ``gamma-0.6`` / ``gamma-1.6``: a camera's tone curve, levels ``255 * (v/255)^g``;
- ``warm`` / ``cool``: a colour cast, red x1.15 and blue x0.85 or the reverse
  (a white balance far outside the renderer's residual 15-40 %);
- ``jpeg-25``: re-encoded at JPEG quality 25 (the renderer's camera: 60-95);
- ``blur-1.5``: Gaussian blur of radius 1.5 px on every frame;
- ``rotate-12``: the frame turned 12 degrees about its centre, the corners
  filled with the frame's border median (a camera mounted askew);
- ``scale-0.75`` / ``scale-1.25``: the frame resized (bicubic), as a camera
  with another resolution or height sees it; the counter's ``px_per_mm``
  scales with it (``SCALES``), as an installer would calibrate it.

``python -m rxvision_trainer camera-changes SRC OUT [--changes a,b,...]``
writes ``OUT/<change>/`` for each change and prints the list.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .data import LABELS_CSV, read_dataset

SCALES = {"scale-0.75": 0.75, "scale-1.25": 1.25}
CHANGES = ("gamma-0.6", "gamma-1.6", "warm", "cool", "jpeg-25", "blur-1.5", "rotate-12", "scale-0.75", "scale-1.25")
JPEG_QUALITY = 92  # re-encoding after a change other than jpeg-25 (the renderer's camera: 60-95)


def _border_median(im: Image.Image) -> tuple:
    a = np.asarray(im)
    ring = np.concatenate([a[:4].reshape(-1, 3), a[-4:].reshape(-1, 3), a[:, :4].reshape(-1, 3),
                           a[:, -4:].reshape(-1, 3)])
    return tuple(int(v) for v in np.median(ring, axis=0))


def apply(change: str, im: Image.Image) -> tuple[Image.Image, int]:
    """The changed frame and the JPEG quality to store it at."""
    im = im.convert("RGB")
    if change.startswith("gamma-"):
        g = float(change.split("-", 1)[1])
        lut = [round(255.0 * (v / 255.0) ** g) for v in range(256)]
        return im.point(lut * 3), JPEG_QUALITY
    if change in ("warm", "cool"):
        r, b = (1.15, 0.85) if change == "warm" else (0.85, 1.15)
        a = np.asarray(im, np.float32) * np.asarray([r, 1.0, b], np.float32)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)), JPEG_QUALITY
    if change == "jpeg-25":
        return im, 25
    if change == "blur-1.5":
        return im.filter(ImageFilter.GaussianBlur(1.5)), JPEG_QUALITY
    if change == "rotate-12":
        return im.rotate(12, resample=Image.Resampling.BILINEAR, fillcolor=_border_median(im)), JPEG_QUALITY
    if change in SCALES:
        s = SCALES[change]
        size = (round(im.width * s), round(im.height * s))
        return im.resize(size, Image.Resampling.BICUBIC), JPEG_QUALITY
    raise ValueError(f"unknown camera change {change!r} (one of {', '.join(CHANGES)})")


def write(src: Path, out: Path, change: str) -> int:
    """Writes ``out`` (a dataset): every image of ``src`` with ``change`` applied."""
    samples = read_dataset(src)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for s in samples:
        with Image.open(s.path) as im:
            changed, quality = apply(change, im)
        dest = out / s.file
        dest.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        changed.save(buf, format="JPEG", quality=quality)
        dest.write_bytes(buf.getvalue())
    shutil.copyfile(src / LABELS_CSV, out / LABELS_CSV)  # written last: the dataset is complete
    return len(samples)
