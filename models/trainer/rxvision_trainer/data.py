"""Datasets in the ``labels.csv`` layout, the formulary, splits and augmentation.

A dataset is a directory with a ``labels.csv`` whose header starts with

    file,ndc,face,name,strength,lookalike_group,seed

(``rxvision-synth dataset`` writes exactly this; more columns may follow and
are kept as extras). ``file`` is a path relative to the directory (``/``
separated, no ``..``); ``ndc`` is the class key and must match the formulary's
``ndc`` for the product to become a class. Only ``file`` and ``ndc`` are
required: a dataset converted from other sources (NLM C3PI, a pharmacy's own
photos; see ``convert_index`` and the README) may leave the rest empty.

Training-time augmentation is defined here by ``Augment`` (small rotation, a
180-degree turn, small shift, mild colour jitter; no mirror by default: a
mirrored imprint never occurs on a real pill), applied before the reference
preprocessing; evaluation images go through the reference preprocessing only.
The default training path (``tensordata``) decodes every image once with
``decode_for_training`` and runs the same augmentation batched in torch; the
Pillow classes here remain the ``--loader pil`` path and the reference.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from .preprocess import MEAN, SCALE, STD, find_repo_root, preprocess_pil

log = logging.getLogger("rxvision_trainer")

LABELS_CSV = "labels.csv"
LABELS_HEADER = ["file", "ndc", "face", "name", "strength", "lookalike_group", "seed", "imitates"]
REQUIRED_COLUMNS = ("file", "ndc")
IMPRINT_COLUMN = "imprint"  # written by rxvision-synth after the standard header; optional
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """A dataset or formulary is not what the layout says; the message names the file."""


@dataclass(frozen=True)
class Sample:
    """One image of a ``labels.csv`` dataset."""

    path: Path
    file: str
    ndc: str
    face: str = ""
    name: str = ""
    strength: str = ""
    lookalike_group: str = ""
    seed: str = ""
    imitates: str = ""  # an impostor (rxvision-synth dataset --impostors): the NDC whose imprint it alters
    # the imprint of the face up as drawn (``;`` between lines, "" for a blank face); None when the dataset
    # has no ``imprint`` column (older renders, other producers)
    imprint: str | None = None
    extra: tuple = field(default_factory=tuple)  # ((column, value), ...) beyond the standard header


# --------------------------------------------------------------------------- datasets
def _safe_relative(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and "\\" not in name and all(part not in ("", ".", "..") for part in p.parts)


def read_dataset(root: str | Path) -> list[Sample]:
    """Reads ``root/labels.csv``; every listed image must exist. Rows keep file order."""
    root = Path(root)
    csv_path = root / LABELS_CSV
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: missing (a dataset directory needs a labels.csv; see the trainer README)")
    samples: list[Sample] = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{csv_path}: header {header} lacks required column(s) {missing}")
        if header[: len(LABELS_HEADER)] != LABELS_HEADER:
            log.info("%s: header %s differs from the standard %s (fine; missing columns read as empty)",
                     csv_path, header, LABELS_HEADER)
        extras = [c for c in header if c not in LABELS_HEADER and c != IMPRINT_COLUMN]
        has_imprint = IMPRINT_COLUMN in header
        for line, row in enumerate(reader, start=2):
            file = (row.get("file") or "").strip()
            ndc = (row.get("ndc") or "").strip()
            if not file or not ndc:
                raise DataError(f"{csv_path}:{line}: empty file or ndc")
            if not _safe_relative(file):
                raise DataError(f"{csv_path}:{line}: unsafe image path {file!r}")
            path = root / file
            if not path.is_file():
                raise DataError(f"{csv_path}:{line}: image {file} does not exist")
            samples.append(Sample(
                path=path, file=file, ndc=ndc,
                face=(row.get("face") or "").strip(),
                name=(row.get("name") or "").strip(),
                strength=(row.get("strength") or "").strip(),
                lookalike_group=(row.get("lookalike_group") or "").strip(),
                seed=(row.get("seed") or "").strip(),
                imitates=(row.get("imitates") or "").strip(),
                imprint=(row.get(IMPRINT_COLUMN) or "") if has_imprint else None,
                extra=tuple((c, row.get(c) or "") for c in extras),
            ))
    if not samples:
        raise DataError(f"{csv_path}: no images listed")
    return samples


def write_labels_csv(root: str | Path, rows: Iterable[dict]) -> Path:
    """Writes ``root/labels.csv`` in the standard layout (missing fields empty), with the ``imprint`` column
    after it when any row has one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LABELS_CSV
    rows = list(rows)
    header = LABELS_HEADER + ([IMPRINT_COLUMN] if any(IMPRINT_COLUMN in r for r in rows) else [])
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in header})
    return path


def convert_index(
    index: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    file_col: str,
    ndc_col: str,
    face_col: str | None = None,
    filter_col: str | None = None,
    filter_values: Sequence[str] = (),
    formulary: "Formulary | None" = None,
    link: bool = True,
) -> int:
    """Turns an image index (CSV/TSV with a header) into a ``labels.csv`` dataset.

    This is how NLM C3PI (or any other photo collection) becomes a training set:
    the index maps an image file name to its NDC; images are linked (or copied)
    into ``out/images/<ndc>/`` and ``labels.csv`` gets name/strength/group from
    the formulary where the NDC is known. NDCs are normalised to the 5-4-2 form
    when they come as 11 plain digits, and an NDC the formulary lacks is mapped
    to the formulary product with the same labeler-product code (another
    package of the same product). Returns the number of images written.
    """
    import os
    import shutil

    index, images, out = Path(index), Path(images), Path(out)
    text = index.read_text(encoding="utf-8-sig")
    dialect = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",\t|;")
    rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
    if not rows:
        raise DataError(f"{index}: no rows")
    for col in (file_col, ndc_col, face_col, filter_col):
        if col and col not in rows[0]:
            raise DataError(f"{index}: no column {col!r} (columns: {list(rows[0])})")
    by_name: dict[str, Path] = {}
    for p in images.rglob("*"):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            by_name.setdefault(p.name, p)
    out_rows, n_missing = [], 0
    for r in rows:
        if filter_col and filter_values and (r.get(filter_col) or "").strip() not in filter_values:
            continue
        src_name = Path((r.get(file_col) or "").strip()).name
        src = by_name.get(src_name)
        if src is None:
            n_missing += 1
            continue
        ndc = normalise_ndc((r.get(ndc_col) or "").strip())
        if formulary is not None and ndc not in formulary.by_ndc:
            # photo collections list package NDCs; the formulary may name another package of the same product
            ndc = formulary.by_product_code.get(ndc.rsplit("-", 1)[0], ndc)
        rel = f"images/{ndc}/{src_name}"
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            if link:
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
            else:
                shutil.copy2(src, dst)
        prod = formulary.by_ndc.get(ndc) if formulary else None
        out_rows.append({
            "file": rel, "ndc": ndc,
            "face": (r.get(face_col) or "").strip() if face_col else "",
            "name": prod["name"] if prod else "",
            "strength": prod["strength"] if prod else "",
            "lookalike_group": (prod.get("lookalike_group") or "") if prod else "",
            "seed": "",
        })
    if n_missing:
        log.warning("%s: %d indexed images not found under %s", index, n_missing, images)
    write_labels_csv(out, out_rows)
    return len(out_rows)


def normalise_ndc(ndc: str) -> str:
    """``00093721001`` -> ``00093-7210-01`` (11 plain digits only); anything else unchanged."""
    digits = ndc.replace("-", "")
    if "-" not in ndc and len(digits) == 11 and digits.isdigit():
        return f"{digits[:5]}-{digits[5:9]}-{digits[9:]}"
    return ndc


# --------------------------------------------------------------------------- formulary
class Formulary:
    """``models/formulary/formulary.json``: the products and their attributes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot read the formulary: {e}") from e
        products = doc.get("products") if isinstance(doc, dict) else None
        if not isinstance(products, list) or not products:
            raise DataError(f"{self.path}: no products list")
        self.schema_version = doc.get("schema_version")
        self.products: list[dict] = products
        self.by_ndc: dict[str, dict] = {}
        for p in products:
            if p.get("ndc") in self.by_ndc:
                raise DataError(f"{self.path}: ndc {p.get('ndc')} appears twice")
            self.by_ndc[p["ndc"]] = p
        self.order = {p["ndc"]: i for i, p in enumerate(products)}
        # labeler-product code (the NDC without its package part) -> ndc, where that is unambiguous
        codes: dict[str, list[str]] = {}
        for p in products:
            codes.setdefault(p["ndc"].rsplit("-", 1)[0], []).append(p["ndc"])
        self.by_product_code = {k: v[0] for k, v in codes.items() if len(v) == 1}

    @staticmethod
    def default_path() -> Path | None:
        root = find_repo_root()
        if root is None:
            return None
        p = root / "models" / "formulary" / "formulary.json"
        return p if p.is_file() else None


# --------------------------------------------------------------------------- classes and splits
@dataclass
class ClassInfo:
    """One output class, in output order."""

    index: int
    ndc: str
    name: str
    strength: str
    lookalike_group: str | None
    attributes: dict  # the formulary entry (or what labels.csv knows)


def build_classes(samples: Sequence[Sample], formulary: Formulary | None, holdout: set[str]) -> list[ClassInfo]:
    """Every NDC of the training data except the held-out ones and impostors, in formulary order.

    An NDC the formulary does not know still becomes a class (name and strength
    from labels.csv) with a warning: a pharmacy's own photos may include
    products before the formulary lists them.
    """
    ndcs = sorted({s.ndc for s in samples if not s.imitates} - holdout)
    first: dict[str, Sample] = {}
    for s in samples:
        first.setdefault(s.ndc, s)
    known = [n for n in ndcs if formulary and n in formulary.by_ndc]
    unknown = [n for n in ndcs if n not in known]
    if formulary is not None:
        known.sort(key=lambda n: formulary.order[n])
        if unknown:
            log.warning("%d NDC(s) of the dataset are not in the formulary %s: %s; their labels come from "
                        "labels.csv only", len(unknown), formulary.path, ", ".join(unknown[:10]))
    classes = []
    for n in known + unknown:
        if formulary is not None and n in formulary.by_ndc:
            p = formulary.by_ndc[n]
            classes.append(ClassInfo(len(classes), n, p["name"], p.get("strength", ""),
                                     p.get("lookalike_group"), dict(p)))
        else:
            s = first[n]
            classes.append(ClassInfo(len(classes), n, s.name or n, s.strength,
                                     s.lookalike_group or None,
                                     {"ndc": n, "name": s.name or n, "strength": s.strength,
                                      "lookalike_group": s.lookalike_group or None}))
    if len(classes) < 2:
        raise DataError(f"need at least 2 training classes, the data has {len(classes)} "
                        f"(after holding out {sorted(holdout)})")
    return classes


def stable_hash(*parts) -> int:
    return zlib.crc32("\x1f".join(map(str, parts)).encode("utf-8"))


def split_train_val(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified per NDC and deterministic in (seed, file names): at least one image of each side per class.

    Rows that share a ``seed`` value are kept on one side (a converted dataset
    can put one physical pill's photos under one seed so that no pill is on
    both sides); ``rxvision-synth`` gives every image its own seed.
    """
    by_ndc: dict[str, dict[str, list[Sample]]] = {}
    for s in samples:
        key = s.seed if s.seed else s.file
        by_ndc.setdefault(s.ndc, {}).setdefault(key, []).append(s)
    train, val = [], []
    for ndc in sorted(by_ndc):
        groups = sorted(by_ndc[ndc].items())
        rng = np.random.default_rng([seed, stable_hash("split", ndc)])
        order = rng.permutation(len(groups))
        n_val = int(round(len(groups) * val_fraction))
        if len(groups) >= 2:
            n_val = min(max(n_val, 1), len(groups) - 1)
        else:
            n_val = 0
        for rank, gi in enumerate(order):
            (val if rank < n_val else train).extend(groups[gi][1])
    train.sort(key=lambda s: s.file)
    val.sort(key=lambda s: s.file)
    return train, val


# --------------------------------------------------------------------------- augmentation
@dataclass
class AugmentConfig:
    """Training-only augmentation. Colours identify products: keep jitter small."""

    max_rotation_deg: float = 12.0   # small arbitrary rotation (the renderer already rotates freely)
    p_turn180: float = 0.5           # 180-degree turn: a "flip" that keeps the imprint readable
    p_mirror: float = 0.0            # true mirror flip: off, a mirrored imprint is not a real pill
    max_shift: float = 0.04          # fraction of the image size
    brightness: float = 0.12         # factor range 1 +- this
    contrast: float = 0.12
    saturation: float = 0.08
    # Camera changes the renderer does not make (issue 17's robustness): a tone curve
    # 255 * (v / 255) ** g with ln g uniform in +- ln(1 + gamma), and a white-balance cast,
    # red and blue gains each 1 +- cast (green 1), applied last (cast, then gamma).
    gamma: float = 0.0
    cast: float = 0.0
    # A camera that compresses harder than the renderer's (quality 60-95): a share p_jpeg of the
    # images re-encoded at a JPEG quality drawn uniformly in jpeg_quality..95 (0: off), after
    # the cast and tone curve, as a camera's encoder comes last.
    jpeg_quality: int = 0
    p_jpeg: float = 0.5


def border_fill(a: np.ndarray) -> tuple[int, int, int]:
    """Median colour of an (H, W, 3) image's outermost pixels: what a rotation or shift fills the corners with."""
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]], axis=0)
    return tuple(int(v) for v in np.median(border, axis=0))


class Augment:
    """Deterministic per (seed, epoch, index) augmentation on the decoded image (Pillow, one image at a time).

    The reference definition of the training augmentation and the ``--loader pil``
    path; the default path is ``tensordata.TensorAugment``, the same augmentation
    batched in torch on the training device.
    """

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()

    @staticmethod
    def _border_fill(img: Image.Image) -> tuple[int, int, int]:
        return border_fill(np.asarray(img))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        c = self.cfg
        img = img.convert("RGB")
        w, h = img.size
        if rng.random() < c.p_mirror:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        angle = float(rng.uniform(-c.max_rotation_deg, c.max_rotation_deg))
        if rng.random() < c.p_turn180:
            angle += 180.0
        dx = float(rng.uniform(-c.max_shift, c.max_shift)) * w
        dy = float(rng.uniform(-c.max_shift, c.max_shift)) * h
        if angle % 360.0 != 0.0 or dx or dy:
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy),
                             fillcolor=self._border_fill(img))
        for enhancer, amount in ((ImageEnhance.Brightness, c.brightness),
                                 (ImageEnhance.Contrast, c.contrast),
                                 (ImageEnhance.Color, c.saturation)):
            if amount > 0:
                img = enhancer(img).enhance(float(rng.uniform(1.0 - amount, 1.0 + amount)))
        if c.gamma > 0 or c.cast > 0:
            g, gains = camera_draw(c, rng)
            img = img.point(camera_lut(g, gains))
        if c.jpeg_quality > 0 and rng.random() < c.p_jpeg:
            img = jpeg_roundtrip(img, int(rng.integers(c.jpeg_quality, JPEG_QUALITY_MAX + 1)))
        return img


JPEG_QUALITY_MAX = 95  # the top of the JPEG augmentation's quality range (the renderer's camera: 60-95)


def check_jpeg_quality(q: int) -> int:
    """The lowest quality of the JPEG augmentation: 0 (off) or 1..95."""
    if not 0 <= q <= JPEG_QUALITY_MAX:
        raise ValueError(f"JPEG quality {q}: choose 1..{JPEG_QUALITY_MAX}, or 0 for no JPEG augmentation")
    return q


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """``img`` encoded as a JPEG at ``quality`` (Pillow's default 4:2:0 subsampling) and decoded again."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def camera_draw(c: AugmentConfig, rng: np.random.Generator) -> tuple[float, tuple[float, float, float]]:
    """One image's tone curve exponent and (red, green, blue) gains (1 where that knob is off)."""
    g = float(np.exp(rng.uniform(-np.log1p(c.gamma), np.log1p(c.gamma)))) if c.gamma > 0 else 1.0
    r, b = (float(v) for v in rng.uniform(1.0 - c.cast, 1.0 + c.cast, 2)) if c.cast > 0 else (1.0, 1.0)
    return g, (r, 1.0, b)


def camera_lut(g: float, gains: tuple[float, float, float]) -> list[int]:
    """Pillow ``point`` table (3 x 256) for a cast ``gains`` then a tone curve ``g``."""
    return [round(255.0 * (min(255.0, v * k) / 255.0) ** g) for k in gains for v in range(256)]


# --------------------------------------------------------------------------- decoding for the tensor path
def decode_for_training(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image as the tensor path stores it: the reference resize to ``size`` (uint8 (size, size, 3),
    exactly what ``preprocess_pil`` normalises) and the border fill colour of the full-resolution image."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        fill = border_fill(np.asarray(im))
        small = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(small, dtype=np.uint8), fill


def decode_chunk(job: tuple[list[str], int]) -> tuple[np.ndarray, np.ndarray]:
    """``decode_for_training`` over a list of paths (a process-pool task): (k, size, size, 3) and (k, 3) uint8."""
    paths, size = job
    imgs = np.empty((len(paths), size, size, 3), np.uint8)
    fills = np.empty((len(paths), 3), np.uint8)
    for k, p in enumerate(paths):
        imgs[k], fills[k] = decode_for_training(Path(p), size)
    return imgs, fills


# --------------------------------------------------------------------------- torch datasets
def load_eval_tensor(path: Path, size: int) -> np.ndarray:
    """The reference preprocessing of one file: float32 (3, size, size). A missing, truncated or
    unreadable image is a ``DataError`` naming the file."""
    try:
        with Image.open(path) as im:
            return preprocess_pil(im, size, size, SCALE, MEAN, STD)[0]
    except OSError as e:  # Pillow's UnidentifiedImageError and truncated reads are OSErrors
        raise DataError(f"{path}: cannot read the image: {e}") from None


def load_eval_array(samples: Sequence[Sample], size: int) -> np.ndarray:
    """Stack of reference-preprocessed images, (N, 3, size, size) float32."""
    out = np.empty((len(samples), 3, size, size), np.float32)
    for i, s in enumerate(samples):
        out[i] = load_eval_tensor(s.path, size)
    return out


class ImageDataset:
    """torch-style dataset: (tensor (3,H,W) float32, class index).

    ``augment`` set: training images; the augmentation RNG is seeded by
    (seed, epoch, index) so runs repeat exactly regardless of worker count.
    Call ``set_epoch`` before each epoch.
    """

    def __init__(self, samples: Sequence[Sample], class_of: dict[str, int], size: int,
                 augment: Augment | None = None, seed: int = 0):
        self.samples = list(samples)
        self.targets = [class_of[s.ndc] for s in self.samples]
        self.size = size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        import torch

        s = self.samples[i]
        with Image.open(s.path) as im:
            im = im.convert("RGB")
            if self.augment is not None:
                im = self.augment(im, np.random.default_rng([self.seed, self.epoch, i]))
            x = preprocess_pil(im, self.size, self.size, SCALE, MEAN, STD)[0]
        return torch.from_numpy(x), self.targets[i]


class OutlierDataset:
    """Synthetic "unknown pill" images for outlier exposure (Hendrycks et al., 2019).

    The counter must answer UNCERTAIN for products it was never trained on, but
    a network trained with cross-entropy alone is as sure of an unknown pill as
    of a known one (its Softmax saturates), so no threshold separates them.
    Training also pushes these images towards the uniform distribution:

    - **chimera**: the two halves (split at 35-65 %, random axis) of two
      augmented images of *different* classes: a shape/colour/imprint
      combination no product has;
    - **hue shift**: a saturated pill's hue turned by 90-270 degrees: a colour no
      product of that shape has (white and grey pills have no hue to turn, so
      they become chimeras instead);
    - **impostor** (when ``impostors`` are given, a share ``p_impostor`` of the
      items): a rendered pill of a product that does not exist, a known one with
      one imprint character altered (``rxvision-synth dataset --impostors``),
      augmented like a training image. The two above teach colour and outline;
      only these teach that one digit makes another product.

    Items are (tensor (3,H,W), the class an impostor imitates or -1),
    deterministic in (seed, epoch, index).
    """

    MIN_SATURATION = 60.0  # mean HSV saturation (0-255) of the central region needed for a hue shift

    def __init__(self, samples: Sequence[Sample], class_of: dict[str, int], size: int, augment: Augment,
                 seed: int = 0, p_hue: float = 0.4, impostors: Sequence[Sample] = (), p_impostor: float = 0.5):
        self.samples = list(samples)
        self.impostors, self.p_impostor = list(impostors), p_impostor
        self.imitated = [class_of.get(s.imitates, -1) for s in self.impostors]
        self.targets = [class_of[s.ndc] for s in self.samples]
        self.by_class: dict[int, list[int]] = {}
        for i, t in enumerate(self.targets):
            self.by_class.setdefault(t, []).append(i)
        self.size, self.augment, self.seed, self.p_hue = size, augment, seed, p_hue
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int, rng: np.random.Generator) -> Image.Image:
        with Image.open(self.samples[i].path) as im:
            return self.augment(im.convert("RGB"), rng)

    def make(self, i: int) -> Image.Image:
        return self.make_with_target(i)[0]

    def make_with_target(self, i: int) -> tuple[Image.Image, int]:
        """Outlier ``i`` of this epoch and the class it imitates (-1: a synthetic outlier or an unknown class)."""
        rng = np.random.default_rng([self.seed, 1_000_003, self.epoch, i])
        if self.impostors and rng.random() < self.p_impostor:
            j = int(rng.integers(len(self.impostors)))
            with Image.open(self.impostors[j].path) as im:
                return self.augment(im.convert("RGB"), rng), self.imitated[j]
        return self._synthetic(i, rng), -1

    def _synthetic(self, i: int, rng: np.random.Generator) -> Image.Image:
        """A chimera or a hue-turned pill made from sample ``i``."""
        a = self._load(i, rng)
        if rng.random() < self.p_hue:
            hsv = np.asarray(a.convert("HSV"), np.int16)
            h, w = hsv.shape[:2]
            centre = hsv[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
            if centre[..., 1].mean() >= self.MIN_SATURATION:
                hsv[..., 0] = (hsv[..., 0] + int(rng.integers(64, 193))) % 256
                return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
        others = [c for c in self.by_class if c != self.targets[i]]
        if not others:
            return a
        c = others[int(rng.integers(len(others)))]
        j = self.by_class[c][int(rng.integers(len(self.by_class[c])))]
        b = self._load(j, rng).resize(a.size, Image.Resampling.BILINEAR)
        frac = float(rng.uniform(0.35, 0.65))
        arr_a, arr_b = np.asarray(a).copy(), np.asarray(b)
        if rng.random() < 0.5:
            cut = int(round(arr_a.shape[1] * frac))
            arr_a[:, cut:] = arr_b[:, cut:]
        else:
            cut = int(round(arr_a.shape[0] * frac))
            arr_a[cut:] = arr_b[cut:]
        return Image.fromarray(arr_a)

    def __getitem__(self, i: int):
        import torch

        img, imitated = self.make_with_target(i)
        x = preprocess_pil(img, self.size, self.size, SCALE, MEAN, STD)[0]
        return torch.from_numpy(x), imitated


def class_counts(samples: Sequence[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        out[s.ndc] = out.get(s.ndc, 0) + 1
    return dict(sorted(out.items()))


def parse_ndc_list(text: str | None) -> list[str]:
    if not text:
        return []
    return [normalise_ndc(t.strip()) for t in text.split(",") if t.strip()]
