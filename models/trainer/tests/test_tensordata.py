"""The tensor training path (``rxvision_trainer.tensordata``) against the reference preprocessing and ``Augment``.

Tolerances, and why:

- decoded store -> ``normalise``: **bit-identical** to ``preprocess_pil`` (the
  store holds Pillow's own resize output; the float32 arithmetic is the same).
- ``TensorAugment`` with every jitter zero (identity warp, factors 1): **1e-5**
  in normalised units. On the CPU it is exact (the identity ``grid_sample``
  lands within ~1e-5 of each pixel centre and the final rounding restores the
  integer level); the allowance is a thousandth of one grey level (one level is
  1/255/std = 0.017-0.018 here), room for another device's float path, far
  below anything that changes a pixel.
- ``TensorAugment`` with real jitter vs Pillow's ``rotate`` + ``ImageEnhance``
  on the same stored image: not equal by design: Pillow truncates to uint8
  after every step (we round once), which makes its images 1.5-2.4 levels
  darker on average (measured), and it blends nothing at the rotated image's
  edge (we blend the fill colour over one pixel). Signed mean difference in
  [0, 3] levels, 99th percentile of |diff| <= 5 levels and of the difference
  around its mean <= 3: enough to catch a wrong sign, axis, centre or formula,
  which move whole images by tens of levels.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from rxvision_trainer.data import (AugmentConfig, ImageDataset, OutlierDataset, Augment, camera_lut,
                                   decode_for_training, load_eval_array, read_dataset, write_labels_csv)
from rxvision_trainer.imprint import UNKNOWN, bags
from rxvision_trainer.preprocess import MEAN, SCALE, STD, preprocess_pil
from rxvision_trainer.smoke import draw
from rxvision_trainer.tensordata import (AugParams, TensorAugment, TensorEvalSet, TensorTrainSource, cache_key,
                                         centre_saturation, decode_paths, hue_turn, load_decoded, normalise)
from rxvision_trainer.train import LoaderSource, TrainConfig, predict_logits, train

ZERO = AugmentConfig(max_rotation_deg=0, p_turn180=0, p_mirror=0, max_shift=0, brightness=0, contrast=0,
                     saturation=0)
LEVEL = 1.0 / 255.0 / max(STD)  # one grey level in normalised units (the smallest of the three)


def _dataset(root: Path, classes: int = 3, per_class: int = 6, size=(96, 80)) -> list:
    """Pillow-drawn pills (smoke.draw), a mix of PNG and JPEG, not square (the store squashes like eval)."""
    rows = []
    for c in range(classes):
        for i in range(per_class):
            img = draw(c, np.random.default_rng([5, c, i])).resize(size)
            jpg = i % 3 == 2
            rel = f"images/c{c}/{i:02d}.{'jpg' if jpg else 'png'}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / rel, **({"format": "JPEG", "quality": 90} if jpg else {"format": "PNG"}))
            rows.append({"file": rel, "ndc": f"0000{c}-0000-00"})
    write_labels_csv(root, rows)
    return read_dataset(root)


def _reference(samples, size) -> np.ndarray:
    return load_eval_array(samples, size)


def test_store_and_eval_set_are_the_reference_preprocessing(tmp_path):
    samples = _dataset(tmp_path)
    # odd sources: RGBA and L images go through convert("RGB") like the reference
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 4), np.uint8), "RGBA").save(samples[0].path)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64), np.uint8), "L").save(samples[1].path)
    for size in (48, 64):
        dec = load_decoded(tmp_path, samples, size, workers=1, cache=False)
        assert dec.images.dtype == torch.uint8 and dec.images.shape == (len(samples), 3, size, size)
        assert dec.fill.dtype == torch.uint8 and dec.fill.shape == (len(samples), 3)
        ref = _reference(samples, size)
        got = normalise(dec.images).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, ref)
        ev = TensorEvalSet(dec, samples, {s.ndc: int(s.ndc[4]) for s in samples}, torch.device("cpu"))
        assert np.array_equal(torch.cat(list(ev.batches(5))).numpy(), ref)
    # two processes give the same bytes as one
    a, fa = decode_paths([s.path for s in samples], 32, 1)
    b, fb = decode_paths([s.path for s in samples], 32, 2)
    assert np.array_equal(a, b) and np.array_equal(fa, fb)


def test_zero_jitter_augmentation_is_the_reference(tmp_path):
    samples = _dataset(tmp_path, per_class=4)
    size = 64
    dec = load_decoded(tmp_path, samples, size, workers=1, cache=False)
    ref = _reference(samples, size)
    n = len(samples)
    aug = TensorAugment(ZERO)
    p = aug.draw(n, np.random.default_rng(0))
    out = aug(dec.images, dec.fill, p)
    assert out.dtype == torch.float32 and out.shape == (n, 3, size, size)
    assert float(out.min()) >= 0 and float(out.max()) <= 255 and torch.equal(out, out.round())
    assert np.abs(normalise(out).numpy() - ref).max() <= 1e-5
    # the colour formulas themselves with factor 1 (amounts on, factors forced to 1)
    on = TensorAugment(AugmentConfig(max_rotation_deg=0, p_turn180=0))
    ones = np.ones(n)
    p1 = AugParams(np.zeros(n, bool), np.zeros(n), np.zeros(n), np.zeros(n), ones, ones, ones)
    assert np.abs(normalise(on(dec.images, dec.fill, p1)).numpy() - ref).max() <= 1e-5
    # a 180-degree turn is an exact flip of both axes
    p180 = AugParams(np.zeros(n, bool), np.full(n, 180.0), np.zeros(n), np.zeros(n), ones, ones, ones)
    assert torch.equal(aug(dec.images, dec.fill, p180), dec.images.flip(2, 3).float())


def _pil_augment(img: Image.Image, fill, p: AugParams, i: int) -> np.ndarray:
    """What data.Augment does with the same parameters, on the same stored image."""
    w, h = img.size
    if p.mirror[i]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.rotate(float(p.angle[i]), resample=Image.Resampling.BILINEAR,
                     translate=(float(p.dx[i]) * w, float(p.dy[i]) * h), fillcolor=tuple(int(v) for v in fill))
    for enh, f in ((ImageEnhance.Brightness, p.brightness[i]), (ImageEnhance.Contrast, p.contrast[i]),
                   (ImageEnhance.Color, p.saturation[i])):
        img = enh(img).enhance(float(f))
    if p.gamma is not None:
        img = img.point(camera_lut(float(p.gamma[i]), (float(p.gain_r[i]), 1.0, float(p.gain_b[i]))))
    return np.asarray(img).astype(np.int16).transpose(2, 0, 1)


def test_jittered_augmentation_follows_pillow(tmp_path):
    samples = _dataset(tmp_path, per_class=4)
    size = 96
    dec = load_decoded(tmp_path, samples, size, workers=1, cache=False)
    n = len(samples)
    cfg = AugmentConfig(max_rotation_deg=25, p_mirror=0.5, max_shift=0.08, brightness=0.2, contrast=0.2,
                        saturation=0.2)
    aug = TensorAugment(cfg)
    p = aug.draw(n, np.random.default_rng(3))
    assert p.mirror.any() and (p.angle > 90).any() and (p.angle < 90).any()
    out = aug(dec.images, dec.fill, p).numpy().astype(np.int16)
    for i in range(n):
        img = Image.fromarray(dec.images[i].permute(1, 2, 0).numpy())
        signed = out[i] - _pil_augment(img, dec.fill[i].numpy(), p, i)
        d = np.abs(signed)
        # Pillow truncates four times (rotate, three enhancers): up to a level darker per step, ~2 in all
        assert 0.0 <= signed.mean() <= 3.0 and d.mean() <= 3.0, (i, signed.mean(), d.mean())
        assert np.percentile(np.abs(signed - signed.mean()), 99) <= 3.0, i
        assert np.percentile(d, 99) <= 5, (i, np.percentile(d, 99))


def test_camera_augmentation_follows_pillow(tmp_path):
    samples = _dataset(tmp_path, per_class=4)
    size = 64
    dec = load_decoded(tmp_path, samples, size, workers=1, cache=False)
    n = len(samples)
    off = TensorAugment(ZERO).draw(n, np.random.default_rng(3))
    assert off.gamma is None and off.gain_r is None, "off, nothing is drawn"
    cfg = AugmentConfig(max_rotation_deg=0, p_turn180=0, max_shift=0, brightness=0, contrast=0, saturation=0,
                        gamma=0.5, cast=0.15)
    aug = TensorAugment(cfg)
    p = aug.draw(n, np.random.default_rng(3))
    assert (p.gamma > 1.1).any() and (p.gamma < 0.9).any() and (p.gamma <= 1.5 + 1e-9).all()
    assert ((p.gain_r >= 0.85) & (p.gain_r <= 1.15)).all() and (p.gain_r != p.gain_b).all()
    out = aug(dec.images, dec.fill, p).numpy().astype(np.int16)
    for i in range(n):
        img = Image.fromarray(dec.images[i].permute(1, 2, 0).numpy())
        d = np.abs(out[i] - _pil_augment(img, dec.fill[i].numpy(), p, i))
        assert d.max() <= 1, (i, d.max())  # the same table; float pow vs Python's, rounded once
    # the Pillow path draws and applies the same kind of change
    a = Augment(cfg)(Image.fromarray(dec.images[0].permute(1, 2, 0).numpy()), np.random.default_rng(5))
    assert np.abs(np.asarray(a, np.int16) - dec.images[0].permute(1, 2, 0).numpy()).mean() > 1.0


def test_train_source_batches_outliers_and_determinism(tmp_path):
    samples = _dataset(tmp_path, classes=4, per_class=5)
    class_of = {f"0000{c}-0000-00": c for c in range(4)}
    dec = load_decoded(tmp_path, samples, 64, workers=1, cache=False)

    def source(seed=1, ob=3):
        return TensorTrainSource(dec, samples, class_of, TensorAugment(), seed, 8, torch.device("cpu"),
                                 outlier_batch=ob)

    src = source()
    assert len(src) == 3  # 20 images, batch 8
    batches = list(src.epoch(0))
    lo = (0.0 - max(MEAN)) / min(STD) - 1e-6
    hi = (1.0 - min(MEAN)) / min(STD) + 1e-6
    seen = []
    for x, y, x_out, imitated in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 64, 64) and y.dtype == torch.int64
        assert x_out.dtype == torch.float32 and x_out.shape == (3, 3, 64, 64)
        assert imitated.tolist() == [-1, -1, -1], "no impostors: no outlier imitates a class"
        assert lo <= float(x.min()) and float(x.max()) <= hi and lo <= float(x_out.min()) and float(x_out.max()) <= hi
        seen += y.tolist()
    assert [x.shape[0] for x, *_ in batches] == [8, 8, 4] and sorted(seen) == sorted(src.targets_np.tolist())
    again = list(source().epoch(0))
    for (x, y, o, _), (x2, y2, o2, _) in zip(batches, again):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(o, o2)
    other = next(iter(src.epoch(1)))[0]
    assert not torch.equal(other, batches[0][0])
    assert all(o is None and i is None for _, _, o, i in source(ob=0).epoch(0))
    # the outlier plan: chimera partners always come from another class, cuts at 35-65 %
    plan = src._plan_outliers(np.arange(20), np.random.default_rng(4))
    own, other = src.targets_np[plan["pos"]], src.targets_np[plan["partner"]]
    assert (own != other).all() and len(set(other.tolist())) > 1
    assert ((plan["cut"][:, 0] >= 0.35 * 64 - 0.5) & (plan["cut"][:, 0] <= 0.65 * 64 + 0.5)).all()
    hue = plan["hue"]
    assert set(np.unique(hue[:, 0])) <= {0.0, 1.0} and ((hue[:, 1] >= 0.25) & (hue[:, 1] <= 0.75)).all()


def test_impostors_fill_their_share_of_the_outlier_slots(tmp_path):
    samples = _dataset(tmp_path, classes=4, per_class=5)
    real, impostors = samples[:15], samples[15:]  # the fourth class stands in for rendered impostors
    # impostor k imitates class k % 3
    impostors = [dataclasses.replace(s, imitates=f"0000{k % 3}-0000-00") for k, s in enumerate(impostors)]
    class_of = {f"0000{c}-0000-00": c for c in range(3)}
    dec = load_decoded(tmp_path, samples, 64, workers=1, cache=False)
    without = TensorTrainSource(dec, real, class_of, TensorAugment(ZERO), 1, 8, torch.device("cpu"), outlier_batch=4)
    every = TensorTrainSource(dec, real, class_of, TensorAugment(ZERO), 1, 8, torch.device("cpu"), outlier_batch=4,
                              impostors=impostors, p_impostor=1.0)
    half = TensorTrainSource(dec, real, class_of, TensorAugment(ZERO), 1, 8, torch.device("cpu"), outlier_batch=4,
                             impostors=impostors, p_impostor=0.5)
    ref = normalise(dec.images[dec.rows(impostors)].float())
    is_impostor = lambda o: [bool(((ref - img).abs().amax(dim=(1, 2, 3)) < 1e-4).any()) for img in o]
    plan_keys = set(without._plan_outliers(np.arange(15), np.random.default_rng(4)))
    assert "impostor" not in plan_keys, "a dataset without impostors plans as before"
    imitates = lambda o: [int(((ref - img).abs().amax(dim=(1, 2, 3)) < 1e-4).float().argmax()) for img in o]
    for (_, _, o_all, i_all), (_, _, o_half, i_half), (_, _, o_none, i_none) in zip(
            every.epoch(0), half.epoch(0), without.epoch(0)):
        assert all(is_impostor(o_all)), "with p_impostor = 1 every outlier is an (un-augmented) impostor"
        # each is labelled with the class its impostor imitates: impostor k imitates class k % 3
        assert i_all.tolist() == [k % 3 for k in imitates(o_all)]
        assert not any(is_impostor(o_none)) and i_none.tolist() == [-1] * len(o_none)
        assert o_half.shape == o_none.shape
        assert [i >= 0 for i in i_half.tolist()] == is_impostor(o_half)
    shares = [is_impostor(o) for _, _, o, _ in half.epoch(0)] + [is_impostor(o) for _, _, o, _ in half.epoch(1)]
    flat = [x for batch in shares for x in batch]
    assert 0 < sum(flat) < len(flat), "p_impostor = 0.5 mixes impostors with synthetic outliers"
    # the Pillow path: OutlierDataset draws them too, with the same labels
    ds = OutlierDataset(real, class_of, 64, Augment(ZERO), impostors=impostors, p_impostor=1.0)
    pixels = {np.asarray(Image.open(s.path).convert("RGB")).tobytes(): k % 3 for k, s in enumerate(impostors)}
    made = [ds.make_with_target(i) for i in range(len(ds))]
    assert all(pixels.get(np.asarray(img).tobytes()) == target for img, target in made)
    assert all(ds[i][1] == made[i][1] for i in range(len(ds)))


def test_outlier_recipe_pieces():
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 200.0
    green = hue_turn(red, torch.tensor([1.0 / 3.0]))
    assert torch.allclose(green[0, :, 0, 0], torch.tensor([0.0, 200.0, 0.0]), atol=1.0)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16))).float()
    assert (hue_turn(x, torch.zeros(2)) - x).abs().max() <= 1.0
    grey = torch.full((1, 3, 8, 8), 128.0)
    assert float(centre_saturation(grey)) == 0.0 and float(centre_saturation(red)) == pytest.approx(255.0)


def test_decode_cache_is_used_and_keyed(tmp_path, caplog):
    samples = _dataset(tmp_path, per_class=2)
    a = load_decoded(tmp_path, samples, 32, workers=1)
    b = load_decoded(tmp_path, samples, 32, workers=1)
    assert (a.source, b.source) == ("decoded", "cache")
    assert torch.equal(a.images, b.images) and torch.equal(a.fill, b.fill)
    files = list((tmp_path / ".rxv-decoded").glob("decoded-32px-*.npz"))
    assert len(files) == 1
    key = cache_key(tmp_path, samples, 32)
    Image.new("RGB", (96, 80), (10, 200, 30)).save(samples[0].path)  # same name, new content
    assert cache_key(tmp_path, samples, 32) != key
    c = load_decoded(tmp_path, samples, 32, workers=1)
    assert c.source == "decoded" and not torch.equal(c.images[0], a.images[0])
    assert len(list((tmp_path / ".rxv-decoded").glob("decoded-32px-*.npz"))) == 1  # the stale one is gone
    assert load_decoded(tmp_path, samples, 32, workers=1, cache=False).source == "decoded"


def test_both_loaders_train(tmp_path):
    from rxvision_trainer.model import ArchConfig, PillNet

    samples = _dataset(tmp_path, classes=3, per_class=4)
    class_of = {f"0000{c}-0000-00": c for c in range(3)}
    cfg = TrainConfig(epochs=1, batch_size=4, workers=0, seed=2)
    dev = torch.device("cpu")
    dec = load_decoded(tmp_path, samples, 32, workers=1, cache=False)
    sources = {
        "tensor": TensorTrainSource(dec, samples, class_of, TensorAugment(), 2, 4, dev, outlier_batch=1),
        "pil": LoaderSource(ImageDataset(samples, class_of, 32, Augment(), seed=2),
                            OutlierDataset(samples, class_of, 32, Augment(), seed=2), cfg, dev),
    }
    for name, src in sources.items():
        torch.manual_seed(0)
        model = PillNet(3, ArchConfig((8, 8, 8, 8), (0, 0, 0, 0)))
        hist = train(model, src, cfg, dev, val_ds=TensorEvalSet(dec, samples, class_of, dev))
        assert len(hist) == 1 and math.isfinite(hist[0]["loss"]) and hist[0]["outlier_loss"] > 0, name
        assert predict_logits(model, ImageDataset(samples, class_of, 32), dev).shape == (len(samples), 3)


def test_bags_ride_along_with_the_same_batches(tmp_path):
    """With bags the source yields the same images, plus each sample's bag and each outlier's (impostors only)."""
    samples = _dataset(tmp_path, classes=4, per_class=5)
    real, impostors = samples[:15], samples[15:]
    impostors = [dataclasses.replace(s, imitates=f"0000{k % 3}-0000-00") for k, s in enumerate(impostors)]
    class_of = {f"0000{c}-0000-00": c for c in range(3)}
    dec = load_decoded(tmp_path, samples, 64, workers=1, cache=False)
    own = bags([f"A{c}" for c in range(15)])  # a distinct bag per sample: which sample a row is can be told
    theirs = bags([f"Z{k};{k}{k}" for k in range(5)])

    def source(with_bags):
        return TensorTrainSource(dec, real, class_of, TensorAugment(ZERO), 1, 8, torch.device("cpu"),
                                 outlier_batch=4, impostors=impostors, p_impostor=0.5,
                                 bags=(own, theirs) if with_bags else None)

    ref = normalise(dec.images[dec.rows(real)].float())
    ref_imp = normalise(dec.images[dec.rows(impostors)].float())
    which = lambda ref, img: int(((ref - img).abs().amax(dim=(1, 2, 3)) < 1e-4).float().argmax())
    seen_unknown = seen_impostor = 0
    for plain, read in zip(source(False).epoch(0), source(True).epoch(0)):
        assert len(plain) == 4 and len(read) == 6
        for a, b in zip(plain, read[:4]):
            assert torch.equal(a, b), "bags change nothing else"
        x, _, x_out, imitated, bag, bag_out = read
        # each image's bag is its own sample's
        assert [which(ref, img) for img in x] == [int(np.flatnonzero((own == row).all(1))[0]) for row in bag.numpy()]
        for img, i, row in zip(x_out, imitated.tolist(), bag_out.numpy()):
            if i >= 0:
                assert (row == theirs[which(ref_imp, img)]).all()
                seen_impostor += 1
            else:
                assert (row == UNKNOWN).all(), "a synthetic outlier has no imprint to read"
                seen_unknown += 1
    assert seen_impostor and seen_unknown
    with pytest.raises(ValueError, match="bags for"):
        TensorTrainSource(dec, real, class_of, TensorAugment(), 1, 8, torch.device("cpu"), bags=(own[:3], theirs))


def test_jpeg_augmentation_follows_pillow(tmp_path):
    """The tensor path's JPEG (the lossy steps in torch) against Pillow's encoder and decoder: at each
    quality its error to Pillow's result is a small part of what the compression itself changes."""
    from rxvision_trainer.data import jpeg_roundtrip
    from rxvision_trainer.tensordata import jpeg_lossy

    samples = _dataset(tmp_path, per_class=3)
    dec = load_decoded(tmp_path, samples, 64, workers=1, cache=False)
    rng = np.random.default_rng(9)
    # texture the pills a little, as powder speckle and shading do, so each quality loses something
    x = (dec.images.float() + torch.from_numpy(rng.normal(0, 12, dec.images.shape)).float()).round().clamp(0, 255)
    for quality in (20, 50, 90):
        got = jpeg_lossy(x, torch.full((len(x),), float(quality))).numpy()
        for i in range(len(x)):
            src = x[i].permute(1, 2, 0).numpy().astype(np.uint8)
            pil = np.asarray(jpeg_roundtrip(Image.fromarray(src), quality), np.float32).transpose(2, 0, 1)
            lost = np.abs(pil - x[i].numpy()).mean()
            off = np.abs(got[i] - pil).mean()
            assert lost > 0.5, (quality, i, lost)
            assert off < 0.35 * lost, (quality, i, off, lost)
    # a size that is not whole 16x16 units is padded as encoders do and cut back
    odd = x[:2, :, :50, :37]
    out = jpeg_lossy(odd, torch.tensor([30.0, 30.0]))
    assert out.shape == odd.shape
    pil = np.asarray(jpeg_roundtrip(Image.fromarray(odd[0].permute(1, 2, 0).numpy().astype(np.uint8)), 30),
                     np.float32).transpose(2, 0, 1)
    assert np.abs(out[0].numpy() - pil).mean() < 0.35 * np.abs(pil - odd[0].numpy()).mean()


def test_jpeg_augmentation_draws_and_applies_only_when_on(tmp_path):
    samples = _dataset(tmp_path, per_class=4)
    dec = load_decoded(tmp_path, samples, 64, workers=1, cache=False)
    n = 400
    assert TensorAugment(ZERO).draw(n, np.random.default_rng(1)).quality is None, "off, nothing is drawn"
    cfg = AugmentConfig(**{**ZERO.__dict__, "jpeg_quality": 20})
    p = TensorAugment(cfg).draw(n, np.random.default_rng(1))
    on = p.quality > 0
    assert 0.4 < on.mean() < 0.6, on.mean()  # half of the images
    assert p.quality[on].min() >= 20 and p.quality[on].max() <= 95 and p.quality[on].min() < 30
    # zero-jitter with JPEG: images drawn without it are the reference, the others are changed
    k = len(samples)
    p = TensorAugment(cfg).draw(k, np.random.default_rng(4))
    out = TensorAugment(cfg)(dec.images, dec.fill, p).numpy()
    ref = dec.images.float().numpy()
    for i in range(k):
        changed = np.abs(out[i] - ref[i]).mean()
        assert (changed == 0) == (p.quality[i] == 0), (i, p.quality[i], changed)
    # the Pillow path re-encodes too
    img = Image.fromarray(dec.images[0].permute(1, 2, 0).numpy())
    outs = [np.asarray(Augment(AugmentConfig(**{**ZERO.__dict__, "jpeg_quality": 10, "p_jpeg": 1.0}))(
        img, np.random.default_rng(s)), np.int16) for s in range(3)]
    assert all(np.abs(o - np.asarray(img, np.int16)).mean() > 0.3 for o in outs)


def test_a_jpeg_quality_out_of_range_is_bad_usage(tmp_path):
    from rxvision_trainer.__main__ import main

    base = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--version", "0.0.1", "--epochs", "1"]
    for bad in ("96", "-1", "high"):
        with pytest.raises(SystemExit) as e:
            main(base + ["--jpeg-quality", bad])
        assert e.value.code == 2, bad
        assert not (tmp_path / "b").exists()
