"""A small time-conditioned U-Net for 3x16x16 images (the bundled model's network).

Built only from convolutions, group norm, SiLU, linear layers and an attention written
with ``matmul`` + ``softmax`` (no fused kernels), so forward-mode
(``torch.func.jvp``), reverse-mode and double-backward differentiation all work
through it -- the library takes Jacobian-vector products of the score.

The network's output has the shape of its input; the bundled model is trained to
predict ``v = alpha eps - sigma x0`` of a VP process (see :mod:`diffdensity.bundled.training`).
It receives the schedule's time ``t`` (``(B,)``) and converts it to the logSNR
``lambda = lmax + (lmin - lmax) t`` of :class:`diffdensity.VP`; ``lambda`` drives a Fourier embedding and the input is
scaled by ``c_in = 1 / sqrt(alpha^2 sd^2 + sigma^2)`` so it has about unit variance at
every noise level (``sd`` is the data standard deviation, a config value).

Resolutions 16 -> 8 -> 4 with channel widths ``channels`` (default 32, 64, 96), one
residual block per level on each way, skip connections by concatenation, and a middle
(residual block, self-attention, residual block) at 4x4. Sized for CPUs: 1.6 M parameters,
about 95 MFLOP (48 M multiply-adds) per 16x16 image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["UNetConfig", "UNet"]


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet` (stored next to the weights as JSON)."""

    in_channels: int = 3
    image_size: int = 16
    channels: tuple[int, ...] = (32, 64, 96)
    blocks_per_level: int = 1
    up_blocks_per_level: int = 1
    attention_levels: tuple[int, ...] = (2,)  # indices into ``channels``; 2 = 4x4
    emb_dim: int = 256
    fourier_features: int = 32
    groups: int = 16
    dropout: float = 0.0
    log_snr_min: float = -10.0
    log_snr_max: float = 10.0
    data_std: float = 0.5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)}")
        d = dict(d)
        for k in ("channels", "attention_levels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _norm(groups: int, ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, ch), ch)


class FourierEmbedding(nn.Module):
    """``lambda -> [cos(2 pi f_k lambda / 20), sin(...)]`` with geometric frequencies 1..64 (fixed)."""

    def __init__(self, features: int):
        super().__init__()
        half = features // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64.0), half)), persistent=False)

    def forward(self, lam: Tensor) -> Tensor:
        arg = 2 * math.pi * (lam / 20)[:, None] * self.freqs[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # scale and shift
        self.norm2 = _norm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over pixels, written out (forward-AD friendly)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        att = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", att, v).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """Time-conditioned U-Net ``net(x, t) -> (B, C, S, S)`` for ``x`` ``(B, C, S, S)`` and VP time ``t`` ``(B,)``."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = cfg = config or UNetConfig()
        if cfg.image_size % (2 ** (len(cfg.channels) - 1)):
            raise ValueError("image_size must be divisible by 2^(levels - 1)")
        g, e = cfg.groups, cfg.emb_dim
        self.fourier = FourierEmbedding(cfg.fourier_features)
        self.emb = nn.Sequential(nn.Linear(cfg.fourier_features, e), nn.SiLU(), nn.Linear(e, e))
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)

        # encoder: per level, residual blocks (+ attention), then a stride-2 conv
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch, skips = cfg.channels[0], []
        for level, width in enumerate(cfg.channels):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(ch, width, e, g, cfg.dropout))
                ch = width
                if level in cfg.attention_levels:
                    blocks.append(Attention(ch, g))
            self.down.append(blocks)
            skips.append(ch)
            if level < len(cfg.channels) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.mid = nn.ModuleList([ResBlock(ch, ch, e, g, cfg.dropout), Attention(ch, g), ResBlock(ch, ch, e, g, cfg.dropout)])

        # decoder: per level (coarse to fine), concatenate the encoder's output of that
        # level, residual blocks (+ attention), then nearest upsampling + conv
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(cfg.channels))):
            width = cfg.channels[level]
            blocks = nn.ModuleList()
            for i in range(cfg.up_blocks_per_level):
                blocks.append(ResBlock(ch + (skips[level] if i == 0 else 0), width, e, g, cfg.dropout))
                ch = width
                if level in cfg.attention_levels:
                    blocks.append(Attention(ch, g))
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, cfg.channels[level - 1], 3, padding=1))
                ch = cfg.channels[level - 1]
        self.norm_out = _norm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for m in blocks:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
        return h

    def log_snr(self, t: Tensor) -> Tensor:
        cfg = self.config
        return cfg.log_snr_max + (cfg.log_snr_min - cfg.log_snr_max) * t

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        lam = self.log_snr(t)
        a2 = torch.sigmoid(lam)
        c_in = torch.rsqrt(a2 * self.config.data_std**2 + (1 - a2))
        emb = self.emb(self.fourier(lam))
        h = self.conv_in(x * c_in[:, None, None, None])
        hs = []
        for level, blocks in enumerate(self.down):
            h = self._run(blocks, h, emb)
            hs.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self._run(self.mid, h, emb)
        for i, blocks in enumerate(self.up):
            h = self._run(blocks, torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
