"""The reference preprocessing, exactly as ``models/fixture/reference_preprocess.py``.

That file is the normative definition the Rust preprocessor is held to; this is
a verbatim copy of its ``preprocess_pil`` so the trainer also works where the
repository is not around (an installed wheel, a Kubernetes job). The test
``tests/test_preprocess.py`` (and the smoke run) check that both give
bit-identical tensors.

    img = Image.open(IMAGE).convert("RGB").resize((W, H), Image.Resampling.BILINEAR)
    x   = (np.asarray(img, float32) * scale - mean) / std      # per channel, float32
    x   = x.transpose(2, 0, 1)[None]                            # HWC -> 1x3xHxW
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# The input spec every RxVision bundle made by this trainer declares.
SCALE = 1.0 / 255.0
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def preprocess_pil(
    img: Image.Image,
    width: int,
    height: int,
    scale: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Preprocess an already opened PIL image; returns float32 array (1, 3, H, W)."""
    img = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    scale32 = np.float32(scale)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
    std32 = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
    x = (x * scale32 - mean32) / std32
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
    return x


def preprocess(
    path: str,
    width: int,
    height: int,
    scale: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Open the image file at `path` and preprocess it; returns float32 (1, 3, H, W)."""
    with Image.open(path) as img:
        return preprocess_pil(img, width, height, scale, mean, std)


def preprocess_file(path: str | Path, size: int) -> np.ndarray:
    """The bundle's preprocessing for a square ``size`` input; (1, 3, size, size)."""
    return preprocess(str(path), size, size, SCALE, MEAN, STD)


def find_repo_root(start: Path | None = None) -> Path | None:
    """The RxVision checkout this package lives in (or ``start`` is in), if any."""
    here = (start or Path(__file__)).resolve()
    for p in [here, *here.parents]:
        if (p / "models" / "fixture" / "reference_preprocess.py").is_file():
            return p
    return None


def load_reference_module():
    """Imports ``models/fixture/reference_preprocess.py`` from the checkout; None outside one."""
    import importlib.util

    root = find_repo_root()
    if root is None:
        return None
    path = root / "models" / "fixture" / "reference_preprocess.py"
    spec = importlib.util.spec_from_file_location("rxvision_reference_preprocess", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod
