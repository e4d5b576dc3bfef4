"""Training the bundled model: ``train(preset, out_dir)`` (``diffdensity train``).

Recipe (preset ``"patches16"``; every number lives in :data:`PRESETS`):

* data: the 16x16 patches of :mod:`diffdensity.bundled.data` (training split), random
  horizontal flips, uniform dequantisation ``x0 = 2 (u + U(0,1)) / 256 - 1``;
* process: :class:`diffdensity.VP` with logSNR ``lambda in [-10, 10]``, linear in
  ``t in [0, 1]``;
* objective: the network predicts ``v = alpha eps - sigma x0`` (so ``eps_hat =
  sigma x_t + alpha v_hat`` and ``x0_hat = alpha x_t - sigma v_hat``: errors are not
  amplified by ``sigma / alpha`` at high noise, which keeps the probability-flow ODE
  stable). The loss is ``max(alpha^2, min_weight) |v_hat - v|^2`` averaged over
  pixels with ``t ~ U(0, 1)`` drawn stratified over the batch. Since
  ``|eps_hat - eps|^2 = alpha^2 |v_hat - v|^2`` and ``lambda`` is linear in ``t``, the
  weight ``alpha^2`` alone is, up to the constant ``(lmax - lmin) D / 2``, the
  continuous-time ELBO of Kingma et al. (2021) -- the likelihood weighting. The floor
  ``min_weight = 0.05`` only acts where ``alpha^2 < 0.05`` (``lambda < -2.9``), where
  the ELBO terms are negligible, and keeps the high-noise predictions that decide the
  samples' coarse colours trained;
* optimiser: AdamW (betas 0.9, 0.99, no weight decay), learning rate warmed up
  linearly, held, then decayed linearly to 10% over the last 20% of the steps;
  gradient norm clipped at 1; EMA of the weights (what is exported);
* float32, one CPU thread by default.

Progress goes to a tqdm bar and to ``out_dir/train_log.csv``. Every
``checkpoint_every`` steps the full state (weights, EMA, AdamW moments) is written to
``out_dir/checkpoint.safetensors`` + ``checkpoint.json`` and the EMA weights are
exported to ``out_dir/NAME.safetensors`` + ``NAME.json`` (the format
:func:`diffdensity.bundled.pretrained.load_pretrained` reads). A later call with
``resume=True`` continues from the checkpoint; batches depend only on the seed and the
step number, so an interrupted and resumed run sees the same data as an uninterrupted
one. ``steps`` may be changed when resuming (the learning-rate schedule follows the new
total from then on); the other settings must match. Only safetensors and JSON are
written -- no pickles.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .nets import UNet, UNetConfig
from .._files import atomic_write
from ..likelihood import dequantize
from ..schedules import VP

__all__ = ["Preset", "PRESETS", "TrainResult", "train", "export_weights"]

FORMAT = "diffdensity-unet-v1"


@dataclass(frozen=True)
class Preset:
    """Everything a training run needs besides the output folder."""

    name: str
    net: dict = field(default_factory=dict)  # UNetConfig fields
    log_snr_min: float = -10.0
    log_snr_max: float = 10.0
    parametrization: str = "v"  # what the network predicts: "v" or "eps"
    min_weight: float = 0.05  # floor of the v-space weight alpha^2 (see the module docstring)
    batch_size: int = 128
    steps: int = 2400
    lr: float = 1e-3
    warmup: int = 200
    decay_fraction: float = 0.2
    final_lr_fraction: float = 0.1
    ema_decay: float = 0.9995
    grad_clip: float = 1.0
    flip: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25
    threads: int = 1


PRESETS: dict[str, Preset] = {
    "patches16": Preset("patches16"),
    # a seconds-long run of a very small network, for tests and smoke checks
    "tiny": Preset(
        "tiny",
        net=dict(channels=(8, 16), attention_levels=(1,), groups=4, emb_dim=16, fourier_features=8),
        batch_size=8,
        steps=4,
        warmup=1,
        checkpoint_every=2,
        log_every=1,
    ),
}


@dataclass
class TrainResult:
    """Where a run left its files, and how far it got."""

    weights: Path
    config: Path
    step: int
    steps: int
    last_loss: float
    minutes: float  # training time in this call
    total_minutes: float  # over all resumed calls


# -- state as flat tensors (safetensors) ---------------------------------------------
def _adam_state(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p)
        if st:
            out[f"opt.{i}.exp_avg"] = st["exp_avg"]
            out[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"]
            out[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def _load_adam_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {
                "exp_avg": tensors[f"opt.{i}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].clone(),
                "step": tensors[f"opt.{i}.step"].reshape(()).clone(),
            }


def _save_atomic_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def _save_atomic_json(obj: Any, path: Path) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def export_weights(net: UNet, path: Path, info: dict, *, parametrization: str = "v") -> tuple[Path, Path]:
    """Write ``net``'s weights to ``path`` (``.safetensors``) and its config to ``path`` with ``.json``.

    ``info`` (JSON-serialisable) is stored in the JSON next to the architecture and the
    SHA-256 of the weight file (checked on loading); the architecture is also stored in
    the safetensors header.
    """
    path = Path(path)
    meta = dict(
        format=FORMAT,
        architecture="UNet",
        net=net.config.to_dict(),
        schedule=dict(name="VP", log_snr_min=net.config.log_snr_min, log_snr_max=net.config.log_snr_max),
        parametrization=parametrization,
        event_shape=[net.config.in_channels, net.config.image_size, net.config.image_size],
        data_range=[-1.0, 1.0],
        **info,
    )
    state = {k: v.to(torch.float32) for k, v in net.state_dict().items()}
    _save_atomic_safetensors(state, path, metadata={"format": FORMAT, "config": json.dumps(meta["net"], sort_keys=True)})
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg_path = path.with_suffix(".json")
    _save_atomic_json(meta, cfg_path)
    return path, cfg_path


# -- schedule of the learning rate ---------------------------------------------------
def _lr(p: Preset, step: int, total: int) -> float:
    if step < p.warmup:
        return p.lr * (step + 1) / p.warmup
    decay_start = int(total * (1 - p.decay_fraction))
    if step < decay_start or total <= decay_start:
        return p.lr
    frac = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return p.lr * (1 - (1 - p.final_lr_fraction) * frac)


def _batch(data: Tensor, p: Preset, step: int, batch_size: int, sched: VP) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The step's batch ``(x_t, t, eps, x0)``; a function of ``(seed, step)`` only."""
    gen = torch.Generator().manual_seed(p.seed * 1_000_003 + step)
    idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
    u = data[idx].to(torch.float32)
    if p.flip:
        flip = torch.rand(batch_size, generator=gen) < 0.5
        u = torch.where(flip[:, None, None, None], u.flip(-1), u)
    x0 = dequantize(u, torch.rand(u.shape, generator=gen))
    # stratified t: one uniform offset, evenly spaced points (lower-variance ELBO estimate)
    t = (torch.rand(1, generator=gen) + torch.arange(batch_size) / batch_size) % 1.0
    t = t[torch.randperm(batch_size, generator=gen)]
    eps = torch.randn(u.shape, generator=gen)
    v = sched(t)
    a, s = v.alpha.to(torch.float32)[:, None, None, None], v.sigma.to(torch.float32)[:, None, None, None]
    return a * x0 + s * eps, t, eps, x0


def _loss(net: UNet, p: Preset, sched: VP, xt: Tensor, t: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
    """Weighted denoising loss (see the module docstring), averaged over the batch and pixels."""
    pred = net(xt, t)
    if p.parametrization == "eps":
        return (pred - eps).square().mean()
    v = sched(t)
    a, s = v.alpha.to(xt.dtype)[:, None, None, None], v.sigma.to(xt.dtype)[:, None, None, None]
    target = a * eps - s * x0
    weight = torch.clamp(a.square(), min=p.min_weight)
    return (weight * (pred - target).square()).mean()


def train(
    preset: str,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    max_minutes: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    threads: int | None = None,
    data: Tensor | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the preset's network into ``out_dir`` (created if needed); resumable.

    Args:
        preset: a key of :data:`PRESETS` (``"patches16"``: the bundled model; ``"tiny"``:
            a seconds-long smoke run).
        out_dir: receives ``NAME.safetensors`` + ``NAME.json`` (EMA weights, the file
            :func:`~diffdensity.bundled.pretrained.load_pretrained` reads), ``checkpoint.*`` and
            ``train_log.csv``.
        resume: continue from ``out_dir/checkpoint.*`` when present (the preset and its
            settings must match); ``False`` starts over.
        max_minutes: stop (after writing a checkpoint) once this much wall time has
            passed in this call; a later call resumes.
        steps, batch_size, seed, threads: override the preset's values.
        data: ``uint8`` patches ``(N, 3, 16, 16)`` to train on instead of
            ``diffdensity.bundled.data.patches("train")``.
        progress: show a tqdm bar.
    """
    p = _preset(preset, steps=steps, batch_size=batch_size, seed=seed, threads=threads)
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(p.threads)
    if data is None:
        from .data import patches

        data = patches("train")
    if data.dtype != torch.uint8 or data.ndim != 4:
        raise ValueError(f"data must be a uint8 tensor (N, C, H, W), got {data.dtype} {tuple(data.shape)}")
    run = _Run(p, out, data)
    if resume:
        run.resume()
    return run.loop(max_minutes, progress)


def _preset(name: str, **overrides: int | None) -> Preset:
    """The preset ``name`` with the given (non-``None``) overrides, checked."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    p = replace(PRESETS[name], **{k: int(v) for k, v in overrides.items() if v is not None})
    if p.parametrization not in ("eps", "v"):
        raise ValueError(f"parametrization must be 'eps' or 'v', got {p.parametrization!r}")
    if p.steps < 1 or p.batch_size < 1 or p.threads < 1:
        raise ValueError("steps, batch_size and threads must be positive")
    return p


class _Run:
    """One training run: the network, its EMA, the optimiser, the checkpoint and the log."""

    def __init__(self, p: Preset, out: Path, data: Tensor):
        self.p, self.out, self.data = p, out, data
        cfg = UNetConfig.from_dict(
            dict(p.net, log_snr_min=p.log_snr_min, log_snr_max=p.log_snr_max, in_channels=data.shape[1], image_size=data.shape[2])
        )
        torch.manual_seed(p.seed)
        self.net, self.ema = UNet(cfg), UNet(cfg)
        self.ema.load_state_dict(self.net.state_dict())
        self.ema.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=p.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.sched = VP(p.log_snr_min, p.log_snr_max)
        self.ckpt_w, self.ckpt_j = out / "checkpoint.safetensors", out / "checkpoint.json"
        self.step, self.total_seconds, self.last_loss = 0, 0.0, float("nan")
        self.settings = {k: v for k, v in asdict(p).items() if k not in ("steps", "threads", "checkpoint_every", "log_every")}
        self.settings["net"] = cfg.to_dict()

    def resume(self) -> None:
        """Continue from ``checkpoint.*`` when present (written with the same settings)."""
        if not (self.ckpt_w.exists() and self.ckpt_j.exists()):
            return
        from safetensors.torch import load_file

        info = json.loads(self.ckpt_j.read_text())
        if info.get("settings") != json.loads(json.dumps(self.settings)):
            raise ValueError(f"{self.ckpt_j} was written with other settings; use resume=False (or another out_dir) to start over")
        try:
            tensors = load_file(str(self.ckpt_w))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read checkpoint {self.ckpt_w}: {e}") from e
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        _load_adam_state(self.opt, tensors)
        self.step, self.total_seconds = int(info["step"]), float(info["seconds"])

    def save(self) -> None:
        """Checkpoint (network, EMA, optimiser) and export the EMA weights."""
        p = self.p
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        tensors.update(_adam_state(self.opt))
        _save_atomic_safetensors(tensors, self.ckpt_w)
        record = dict(step=self.step, seconds=self.total_seconds, last_loss=self.last_loss, settings=self.settings)
        _save_atomic_json(record, self.ckpt_j)
        training = dict(
            step=self.step, target_steps=p.steps, minutes=round(self.total_seconds / 60, 2),
            data=f"diffdensity.bundled.data.patches('train'), {self.data.shape[0]} patches", recipe=self.settings,
        )  # fmt: skip
        export_weights(self.ema, self.out / f"{p.name}.safetensors", dict(preset=p.name, training=training), parametrization=p.parametrization)

    def open_log(self):
        """``train_log.csv`` for appending (rows after the resumed checkpoint dropped) and its writer."""
        log_path = self.out / "train_log.csv"
        new_log = not log_path.exists() or self.step == 0
        if not new_log:  # drop rows written after the checkpoint we resume from
            with open(log_path, newline="") as f:
                rows = list(csv.reader(f))
            kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= self.step]
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerows(kept)
        log_file = open(log_path, "w" if new_log else "a", newline="")
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["step", "loss", "lr", "grad_norm", "minutes"])
        return log_file, log

    def update(self) -> tuple[float, float, float]:
        """One optimiser step and the EMA update; ``(loss, lr, grad norm)``."""
        p = self.p
        lr = _lr(p, self.step, p.steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        xt, t, eps, x0 = _batch(self.data, p, self.step, p.batch_size, self.sched)
        loss = _loss(self.net, p, self.sched, xt, t, eps, x0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {self.step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), p.grad_clip))
        self.opt.step()
        self.step += 1
        decay = min(p.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for pe, pn in zip(self.ema.parameters(), self.net.parameters()):
                pe.lerp_(pn, 1 - decay)
        return loss.item(), lr, gnorm

    def loop(self, max_minutes: float | None, progress: bool) -> TrainResult:
        """Train until the preset's step count (or ``max_minutes``), logging and checkpointing."""
        from tqdm.auto import tqdm

        p = self.p
        start = last = time.monotonic()
        loss_acc, n_acc = 0.0, 0
        log_file, log = self.open_log()
        bar = tqdm(total=p.steps, initial=self.step, desc=f"train {p.name}", disable=not progress, dynamic_ncols=True)
        self.net.train()
        try:
            while self.step < p.steps:
                loss, lr, gnorm = self.update()
                loss_acc, n_acc = loss_acc + loss, n_acc + 1
                now = time.monotonic()
                self.total_seconds += now - last
                last = now
                bar.update(1)
                if self.step % p.log_every == 0 or self.step == p.steps:
                    self.last_loss = loss_acc / n_acc
                    log.writerow([self.step, f"{self.last_loss:.5f}", f"{lr:.3g}", f"{gnorm:.3f}", f"{self.total_seconds / 60:.2f}"])
                    log_file.flush()
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2g}")
                    loss_acc, n_acc = 0.0, 0
                out_of_time = max_minutes is not None and (now - start) / 60 >= max_minutes
                if self.step % p.checkpoint_every == 0 or self.step == p.steps or out_of_time:
                    self.save()
                if out_of_time:
                    break
            if self.step == p.steps and not (self.out / f"{p.name}.safetensors").exists():
                self.save()
        finally:
            bar.close()
            log_file.close()
        return TrainResult(
            weights=self.out / f"{p.name}.safetensors", config=self.out / f"{p.name}.json", step=self.step, steps=p.steps,
            last_loss=self.last_loss, minutes=(time.monotonic() - start) / 60, total_minutes=self.total_seconds / 60,
        )  # fmt: skip
