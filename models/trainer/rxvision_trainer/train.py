"""The training loop: AdamW, linear warm-up then cosine decay, cross-entropy.

Runs on CUDA (bf16 autocast, channels-last, fused AdamW) or the CPU;
``resolve_device`` turns ``auto`` into whichever is there. Deterministic in the
seed on the CPU; on CUDA as far as cuDNN allows (``deterministic`` requests its
deterministic kernels).

Batches come from a *source*: an object with ``len()`` (batches per epoch) and
``epoch(e)`` yielding ``(x, y, x_out, imitated)`` on the device - normalised
inputs, class indices, a batch of synthetic unknown pills for outlier
exposure and the class each imitates (-1 for none), or None and None - and,
when it was given the imprints, ``(bag, bag_out)`` after them: the bags of
imprint characters the model's imprint head is taught to read (``imprint``).
``tensordata.TensorTrainSource`` (decode once, augment on the device) is the
default; ``LoaderSource`` is the Pillow path (``--loader pil``).
Validation data is anything ``predict_logits`` takes: a ``TensorEvalSet`` or an
``ImageDataset``.

**Training across sessions** (``Resumable``): after every epoch the whole state
(weights, optimizer moments, step, history, torch's random state) is written
atomically to a checkpoint file, together with the run's *identity* (the
recipe, the classes and a fingerprint of the images' bytes). A later process
given the same file and identity continues at the next epoch; the learning-rate
schedule is over the full ``cfg.epochs``, so a run paused and resumed any
number of times is the same run as one without pauses (bit-identical on the
CPU, tested). A checkpoint of another run is refused (``CheckpointError``),
never silently restarted or mixed. ``pause_at`` (a wall-clock deadline) ends a
session after the last epoch expected to finish before it (judged by the
session's slowest epoch); at least one epoch runs per session, so every
session makes progress.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data import ImageDataset, OutlierDataset
from .imprint import imprint_loss

log = logging.getLogger("rxvision_trainer")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    outlier_weight: float = 0.5    # weight of the outlier-exposure loss (0: off)
    outlier_fraction: float = 0.25  # outlier images per batch, as a share of the batch size
    # the loss of a rendered impostor of a known class: "uniform" (outlier exposure, as every
    # outlier) or "away" (-log(1 - p(imitated class)): only the product it imitates is penalised)
    impostor_loss: str = "uniform"
    # weight of the imprint head's loss (``imprint.imprint_loss``; 0: off; needs a model with the head
    # and a source with the bags)
    imprint_weight: float = 0.0
    workers: int = -1          # --loader pil only (DataLoader workers); -1: pick from the device and CPU count
    seed: int = 0
    deterministic: bool = True
    # Wall-clock budget for the whole training loop in seconds (0: none). After the
    # first epoch the epoch count is cut to what fits, judged by that epoch's time.
    # With warmup_epochs >= 1 the first epoch is warm-up only, so the run is
    # exactly the run with --epochs set to the reduced count.
    time_budget: float = 0.0


CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """The checkpoint is unreadable or belongs to another run (recipe, classes or data differ)."""


@dataclass
class Resumable:
    """Where a run keeps its state between sessions, and when this session ends.

    ``identity``: JSON-able facts that make a run this run (hyper-parameters,
    architecture, classes, data fingerprint); a checkpoint whose identity
    differs is refused. ``pause_at``: ``time.time()`` deadline of this session
    (None: train to the end).
    """

    path: Path
    identity: dict
    pause_at: float | None = None


def _differences(saved: dict, wanted: dict) -> list[str]:
    keys = sorted(set(saved) | set(wanted))
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]


def _read_checkpoint(path: Path, advice: str = "") -> dict:
    """The state saved in ``path``; ``CheckpointError`` (ending in ``advice``) when it is not a readable one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated or not a torch file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}){advice}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a format-{CHECKPOINT_FORMAT} rxvision training checkpoint")
    return state


def load_checkpoint(resumable: Resumable, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int, list]:
    """Restores model, optimizer and torch's RNG from ``resumable.path`` when it exists.

    Returns (epochs done, steps done, history); (0, 0, []) without a checkpoint.
    Raises ``CheckpointError`` for another run's checkpoint or a file that is
    not a readable checkpoint; the model, optimizer and file are then unchanged.
    """
    path = Path(resumable.path)
    if not path.exists():
        return 0, 0, []
    state = _read_checkpoint(path, "; move it away to start this run afresh")
    diff = _differences(state["identity"], resumable.identity)
    if diff:
        raise CheckpointError(f"checkpoint {path} belongs to another run; it differs in: " + "; ".join(diff))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]), int(state["step"]), list(state["history"])


def load_initial_weights(path: Path | str, model: nn.Module, classes: Sequence[str]) -> None:
    """Loads the weights of another run's checkpoint into ``model`` (``--init-from``).

    The checkpoint must be a training checkpoint of a model with the same
    classes in the same order and the same architecture; its optimizer state
    and schedule are not taken (the new run's schedule starts afresh). Raises
    ``CheckpointError`` otherwise; the model is then unchanged. A model with
    an imprint head may start from one without: the head keeps its fresh
    weights (the features it reads are what the checkpoint brings).
    """
    path = Path(path)
    state = _read_checkpoint(path)
    theirs = list(state["identity"].get("classes", []))
    if theirs != list(classes):
        extra, missing = sorted(set(theirs) - set(classes)), sorted(set(classes) - set(theirs))
        raise CheckpointError(f"checkpoint {path} has other classes than this run (only there: {extra or 'none'}; "
                              f"only here: {missing or 'none'}; or another order)")
    ours = model.state_dict()
    weights = dict(state["model"])
    if not any(k.startswith(("imprint_head.", "imprint_hidden.")) for k in weights):
        weights.update({k: v for k, v in ours.items() if k.startswith(("imprint_head.", "imprint_hidden."))})
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes.keys() != ours.keys() or any(shapes[k] != tuple(v.shape) for k, v in ours.items()):
        raise CheckpointError(f"checkpoint {path} is of another architecture (widths "
                              f"{state['identity'].get('widths')}, depths {state['identity'].get('depths')})")
    model.load_state_dict(weights)


def save_checkpoint(resumable: Resumable, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int,
                    history: list) -> None:
    """Writes the state after ``epoch`` completed epochs (a temporary file renamed over the old one)."""
    path = Path(resumable.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "identity": resumable.identity, "epoch": epoch, "step": step,
                "history": history, "model": model_state, "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    if name not in ("cuda", "cpu"):
        raise SystemExit(f"--device {name!r}: use cuda, cpu or auto")
    return torch.device(name)


def outlier_batch_size(cfg: TrainConfig) -> int:
    """Outlier images per batch (0: outlier exposure off)."""
    if cfg.outlier_weight <= 0:
        return 0
    return max(1, int(round(cfg.batch_size * cfg.outlier_fraction)))


def default_workers(device: torch.device) -> int:
    n = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, n - 1))
    # On the CPU the workers compete with torch's own threads for the cores.
    return 0 if n <= 4 else min(4, n // 4)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def make_loader(ds: ImageDataset, batch_size: int, shuffle: bool, workers: int, seed: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
        pin_memory=device.type == "cuda", drop_last=False, persistent_workers=False,
    )


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class LoaderSource:
    """The Pillow path (``--loader pil``): decoding and ``Augment`` per image in DataLoader workers.

    Same shuffling and outlier streams as before the tensor path existed, so
    its runs repeat the earlier ones exactly.
    """

    def __init__(self, ds: ImageDataset, outlier_ds: OutlierDataset | None, cfg: TrainConfig,
                 device: torch.device):
        self.ds, self.outlier_ds, self.device, self.seed = ds, outlier_ds, device, cfg.seed
        self.workers = default_workers(device) if cfg.workers < 0 else cfg.workers
        self.oe_batch = outlier_batch_size(cfg) if outlier_ds is not None and len(outlier_ds) else 0
        self.loader = make_loader(ds, cfg.batch_size, True, self.workers, cfg.seed, device)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int):
        self.ds.set_epoch(epoch)
        oe_iter = None
        if self.oe_batch:
            self.outlier_ds.set_epoch(epoch)
            oe_iter = iter(make_loader(self.outlier_ds, self.oe_batch, True, self.workers,
                                       self.seed + 7919 * (epoch + 1), self.device))
        for x, y in self.loader:
            x_out = imitated = None
            if oe_iter is not None:
                try:
                    x_out, imitated = next(oe_iter)
                except StopIteration:
                    oe_iter = None
                else:
                    x_out = x_out.to(self.device, non_blocking=True)
                    imitated = imitated.to(self.device, non_blocking=True)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), x_out, imitated


IMPOSTOR_LOSSES = ("uniform", "away")


def outlier_loss(logits: torch.Tensor, imitated: torch.Tensor | None, impostor_loss: str) -> torch.Tensor:
    """Mean loss of a batch of outliers' ``logits`` (N, C).

    Every outlier is pushed towards the uniform distribution (cross-entropy to
    it: the mean over classes of -log p), except, with ``impostor_loss ==
    "away"``, a rendered impostor of a known class (``imitated`` >= 0): its
    loss is -log(1 - p(imitated class)). The counter's question with an
    expected product is whether the pill is *that* product, and an impostor
    is dangerous only as the product it imitates; the uniform target also
    spends the gradient on classes it was never near.
    """
    if impostor_loss not in IMPOSTOR_LOSSES:
        raise ValueError(f"impostor loss {impostor_loss!r}: choose one of {', '.join(IMPOSTOR_LOSSES)}")
    logp = torch.log_softmax(logits, dim=1)
    if impostor_loss == "uniform" or imitated is None:
        return -logp.mean()
    uniform = -logp.mean(dim=1)
    p = logp.gather(1, imitated.clamp(min=0).view(-1, 1)).squeeze(1).exp()
    away = -torch.log1p(-p.clamp(max=1.0 - 1e-6))
    return torch.where(imitated >= 0, away, uniform).mean()


@torch.no_grad()
def predict_logits(model: nn.Module, data, device: torch.device, batch_size: int = 128,
                   workers: int = 0) -> np.ndarray:
    """float32 logits (N, C) in dataset order, eval mode, full precision.

    ``data``: a ``tensordata.TensorEvalSet`` (its ``batches``) or an ``ImageDataset``
    (a DataLoader with ``workers``).
    """
    model.eval()
    out = []
    if hasattr(data, "batches"):
        xs = data.batches(batch_size)
    else:
        xs = (x for x, _y in make_loader(data, batch_size, False, workers, 0, device))
    for x in xs:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)


def train(model: nn.Module, source, cfg: TrainConfig, device: torch.device, val_ds=None,
          class_weights: Sequence[float] | None = None, resumable: Resumable | None = None) -> list[dict]:
    """Trains in place; returns one dict of statistics per epoch trained so far.

    With ``resumable`` the run starts from its checkpoint (if any), saves one
    after every epoch, and returns early - fewer than ``cfg.epochs`` entries -
    when ``pause_at`` comes before the next epoch would end; the model is then
    mid-schedule, to be resumed, not exported. ``resumable`` and
    ``cfg.time_budget`` exclude each other (the budget changes the schedule).

    ``source``: a ``tensordata.TensorTrainSource`` or a ``LoaderSource``. When it
    yields outlier batches (``cfg.outlier_weight`` > 0), their loss is
    ``outlier_loss`` (outlier exposure; rendered impostors as
    ``cfg.impostor_loss`` says), weighted by ``cfg.outlier_weight``.
    """
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            **({"fused": True} if device.type == "cuda" else {}))
    steps_per_epoch = max(1, len(source))
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(0, total - 1))

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    if resumable is not None and cfg.time_budget > 0:
        raise ValueError("a time budget shortens the schedule; a resumable run keeps it: use one or the other")
    history = []
    step = 0
    epoch = 0
    if resumable is not None:
        epoch, step, history = load_checkpoint(resumable, model, opt)
        if epoch:
            log.info("resumed from %s after epoch %d of %d", resumable.path, epoch, cfg.epochs)

    reading = cfg.imprint_weight > 0
    if reading and getattr(model, "imprint_head", None) is None:
        raise ValueError("an imprint loss needs a model with an imprint head (ArchConfig.imprint_outputs)")
    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    epochs = cfg.epochs
    slowest = 0.0  # this session's slowest epoch, to judge whether another fits before the deadline
    while epoch < epochs:
        t0 = time.perf_counter()
        model.train()
        # sums stay on the device: no host synchronisation per step
        n = 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        oe_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        imprint_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in source.epoch(epoch):
            x, y, x_out, imitated = batch[:4]
            bag, bag_out = batch[4:] if reading else (None, None)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            n_known = len(y)
            if x_out is not None and cfg.outlier_weight > 0:
                x = torch.cat([x, x_out], dim=0)
                if reading:
                    bag = torch.cat([bag, bag_out], dim=0)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                all_logits, read = model.forward_both(x) if reading else (model(x), None)
                all_logits = all_logits.float()
                logits = all_logits[:n_known]
                loss = loss_fn(logits, y)
                if len(all_logits) > n_known:
                    oe = outlier_loss(all_logits[n_known:], imitated, cfg.impostor_loss)
                    loss = loss + cfg.outlier_weight * oe
                    oe_sum += oe.detach().double() * n_known
                if reading:
                    il = imprint_loss(read.float(), bag)
                    loss = loss + cfg.imprint_weight * il
                    imprint_sum += il.detach().double() * n_known
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            n += n_known
            loss_sum += loss.detach().double() * n_known
            correct += (logits.detach().argmax(1) == y).sum()
        stats = {"epoch": epoch + 1, "loss": float(loss_sum) / max(1, n), "train_top1": int(correct) / max(1, n),
                 "outlier_loss": float(oe_sum) / max(1, n),
                 **({"imprint_loss": float(imprint_sum) / max(1, n)} if reading else {}),
                 "lr": lr_at(max(0, step - 1)), "seconds": 0.0}
        if val_ds is not None and len(val_ds):
            logits = predict_logits(model, val_ds, device, workers=getattr(source, "workers", 0))
            stats["val_top1"] = float((logits.argmax(1) == np.asarray(val_ds.targets)).mean())
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(stats)
        log.info("epoch %d/%d: loss %.4f (outliers %.4f%s) train top-1 %.4f%s (%.1f s)", epoch + 1, epochs,
                 stats["loss"], stats["outlier_loss"],
                 f", imprint {stats['imprint_loss']:.4f}" if "imprint_loss" in stats else "", stats["train_top1"],
                 f", val top-1 {stats['val_top1']:.4f}" if "val_top1" in stats else "", stats["seconds"])
        if epoch == 0 and cfg.time_budget > 0 and epochs > 1:
            fit = max(1, int(cfg.time_budget // max(stats["seconds"], 1e-3)))
            if fit < epochs:
                log.warning("time budget %.0f s: the first epoch took %.1f s, so training stops after %d of %d "
                            "epochs (the same run as --epochs %d)", cfg.time_budget, stats["seconds"], fit, epochs, fit)
                epochs = fit
                total = epochs * steps_per_epoch  # lr_at reads it: the cosine now ends at the new last step
        epoch += 1
        if resumable is not None:
            save_checkpoint(resumable, model, opt, epoch, step, history)
            slowest = max(slowest, stats["seconds"])
            if epoch < epochs and resumable.pause_at is not None and time.time() + slowest > resumable.pause_at:
                log.warning("pausing after epoch %d of %d: the next would end after the session's deadline; "
                            "the state is in %s", epoch, epochs, resumable.path)
                break
    model.eval()
    return history
