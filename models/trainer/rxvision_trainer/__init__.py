"""RxVision reference trainer.

Trains the pill classifier on a dataset in the ``labels.csv`` layout, calibrates
it (temperature scaling), exports it to ONNX, quantizes it to static int8 QDQ
with ONNX Runtime and writes a complete model bundle (see ``models/src/bundle.rs``
for the contract the bundle is checked against).

Modules by capability:

- ``preprocess`` — the reference preprocessing (a copy of
  ``models/fixture/reference_preprocess.py``, kept identical by a test)
- ``data``       — ``labels.csv`` datasets, the formulary, splits, augmentation
  (Pillow: the reference definition and the ``--loader pil`` path)
- ``tensordata`` — the default training data path: decode once, augment on the device
- ``model``      — the plain 3x3 conv network, MAC/parameter counts, BN folding
- ``train``      — the training loop
- ``calibrate``  — temperature scaling, ECE, open-set thresholds
- ``export``     — ONNX export and ONNX Runtime int8 QDQ quantisation
- ``profile``    — the drift reference profile (``profile.json``)
- ``bundle``     — self-test selection, labels, model card, manifest
- ``pipeline``   — the whole ``train`` command, end to end
- ``smoke``      — a tiny end-to-end run (``python -m rxvision_trainer.smoke``)
- ``bench_data`` — data-path throughput, Pillow vs tensor (``python -m rxvision_trainer.bench_data``)
"""
from __future__ import annotations

__version__ = "0.1.0"
