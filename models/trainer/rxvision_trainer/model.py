"""PillNet: a plain 3x3 convolution network, chosen for tract.

``cargo bench -p rxvision-models --bench architectures`` (README, Performance)
showed that tract runs plain 3x3 convolutions fastest and depthwise
convolutions slowest (inverted residuals worst), so the pill model uses only
dense 3x3 convolutions:

    stage s (width w_s):  conv3x3 stride 2 -> BN -> ReLU,  then depth_s x (conv3x3 -> BN -> ReLU)
    widths 32-64-128-256, depth 1 each; global average pool; linear head

At 128x128 the first stage works at 64x64, so an imprint character of ~10 px
in the input still spans ~5 px where the first two convolutions read it;
stage 2 sees 32x32 with a 64-channel basis for strokes. No residuals: they
would add requantised ``Add`` nodes to the int8 graph for no gain at this depth.

For export, BatchNorm is folded into the convolutions (``fused_layers``), so
the ONNX graph is only Conv+Relu, GlobalAveragePool, Flatten, Gemm, Softmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

DEFAULT_WIDTHS = (32, 64, 128, 256)
DEFAULT_DEPTHS = (1, 1, 1, 1)


@dataclass(frozen=True)
class ArchConfig:
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    depths: tuple[int, ...] = DEFAULT_DEPTHS
    dropout: float = 0.1
    # the imprint-reading head (``imprint``): characters read x count bins; 0 = no such head
    imprint_outputs: tuple[int, int] = (0, 0)
    # its hidden width: a 1x1 conv + ReLU on the last feature map before pooling (0: linear on the pooled features)
    imprint_hidden: int = 0
    # width of a stride-1 conv-BN-ReLU at the input's full resolution before the first stage (0: none), so that
    # strokes a few pixels wide are read before the first stride-2 convolution halves them
    stem: int = 0

    def describe(self) -> str:
        stages = ", ".join(f"{w}x(1+{d})" for w, d in zip(self.widths, self.depths))
        hidden = f"a 1x1 conv to {self.imprint_hidden} + ReLU, GAP, linear" if self.imprint_hidden else "linear"
        reader = (f" (and an imprint head, {hidden}: {self.imprint_outputs[0]} characters x "
                  f"{self.imprint_outputs[1]} count bins, for training)" if self.imprint_outputs[0] else "")
        stem = f"a stride-1 {self.stem}-channel stem, then " if self.stem else ""
        return f"{stem}plain 3x3 conv-BN-ReLU stages [{stages}] (first conv of each stage stride 2), GAP, linear{reader}"


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class PillNet(nn.Module):
    def __init__(self, num_classes: int, arch: ArchConfig = ArchConfig()):
        super().__init__()
        if len(arch.widths) != len(arch.depths):
            raise ValueError("widths and depths must have the same length")
        layers: list[nn.Module] = []
        cin = 3
        if arch.stem:
            layers.append(ConvBNReLU(cin, arch.stem, 1))
            cin = arch.stem
        for w, d in zip(arch.widths, arch.depths):
            layers.append(ConvBNReLU(cin, w, 2))
            layers.extend(ConvBNReLU(w, w, 1) for _ in range(d))
            cin = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(arch.dropout)
        self.head = nn.Linear(cin, num_classes)
        chars, bins = arch.imprint_outputs
        # reads the bag of imprint characters (``imprint``) from the pooled features, or from every position of
        # the last feature map through a hidden 1x1 layer, pooled after it; training only so far
        self.imprint_head = nn.Linear(arch.imprint_hidden or cin, chars * bins) if chars else None
        self.imprint_hidden = (nn.Sequential(nn.Conv2d(cin, arch.imprint_hidden, 1), nn.ReLU(inplace=True))
                               if chars and arch.imprint_hidden else None)
        self.arch = arch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for head in (self.head, self.imprint_head):
            if head is not None:
                nn.init.normal_(head.weight, std=0.01)
                nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits
        return self.forward_both(x)[0]

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits (N, C) and the imprint head's count-bin logits (N, chars, bins), or None without one."""
        f = self.features(x)
        pooled = self.dropout(f.mean(dim=(2, 3)))
        if self.imprint_head is None:
            return self.head(pooled), None
        read = pooled if self.imprint_hidden is None else self.dropout(self.imprint_hidden(f).mean(dim=(2, 3)))
        return self.head(pooled), self.imprint_head(read).view(len(x), *self.arch.imprint_outputs)


# --------------------------------------------------------------------------- cost
@dataclass
class Cost:
    macs: int = 0
    params: int = 0
    layers: list = field(default_factory=list)  # (name, out shape, macs)

    def summary(self) -> str:
        return f"{self.macs / 1e6:.1f} MMAC, {self.params / 1e3:.1f} k parameters"


def count_cost(model: nn.Module, size: int) -> Cost:
    """MACs of one forward pass at ``size``x``size`` (convolutions and the linear head) and parameters."""
    cost = Cost(params=sum(p.numel() for p in model.parameters()))
    hooks = []

    def conv_hook(name):
        def hook(m: nn.Conv2d, _inp, out):
            k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
            macs = int(out.numel() // out.shape[0]) * k
            cost.macs += macs
            cost.layers.append((name, tuple(out.shape[1:]), macs))
        return hook

    def linear_hook(name):
        def hook(m: nn.Linear, _inp, out):
            macs = m.in_features * m.out_features
            cost.macs += macs
            cost.layers.append((name, tuple(out.shape[1:]), macs))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            model(torch.zeros(1, 3, size, size, device=dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return cost


# --------------------------------------------------------------------------- BN folding
@dataclass
class FusedConv:
    weight: np.ndarray  # (cout, cin, 3, 3) float32
    bias: np.ndarray    # (cout,) float32
    stride: int
    padding: int


@dataclass
class FusedModel:
    convs: list[FusedConv]      # each followed by ReLU
    head_weight: np.ndarray     # (classes, features) float32
    head_bias: np.ndarray       # (classes,) float32


def fuse(model: PillNet) -> FusedModel:
    """Folds every BatchNorm into its convolution (eval statistics): w' = w*g/s, b' = beta - mu*g/s."""
    convs = []
    for block in model.features:
        conv, bn = block[0], block[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        w = conv.weight.detach().double().cpu()
        gamma, beta = bn.weight.detach().double().cpu(), bn.bias.detach().double().cpu()
        mu, var = bn.running_mean.detach().double().cpu(), bn.running_var.detach().double().cpu()
        s = torch.sqrt(var + bn.eps)
        wf = w * (gamma / s).reshape(-1, 1, 1, 1)
        bf = beta - mu * gamma / s
        if conv.bias is not None:
            bf = bf + conv.bias.detach().double().cpu() * gamma / s
        convs.append(FusedConv(wf.float().numpy(), bf.float().numpy(), conv.stride[0], conv.padding[0]))
    return FusedModel(convs, model.head.weight.detach().float().cpu().numpy().copy(),
                      model.head.bias.detach().float().cpu().numpy().copy())


def fused_forward(fm: FusedModel, x: torch.Tensor) -> torch.Tensor:
    """Logits of the folded network (to check the folding against the model)."""
    for c in fm.convs:
        x = F.relu(F.conv2d(x, torch.from_numpy(c.weight), torch.from_numpy(c.bias), stride=c.stride,
                            padding=c.padding))
    x = x.mean(dim=(2, 3))
    return x @ torch.from_numpy(fm.head_weight).T + torch.from_numpy(fm.head_bias)
