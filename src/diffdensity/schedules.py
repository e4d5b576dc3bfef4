"""Forward processes ``x_t = alpha_t x_0 + sigma_t eps`` (docs/math.md s.1).

A schedule is stateless: evaluated at a tensor ``t`` it returns alpha, sigma and
their time derivatives together, from which the drift coefficient
``f = d log(alpha)/dt``, the squared diffusion ``g^2 = d(sigma^2)/dt - 2 f sigma^2``
and the logSNR ``lambda = log(alpha^2 / sigma^2)`` follow.

Time runs from data (``t_min``) to noise (``t_max``); logSNR decreases in ``t``.
The prior is ``N(0, sigma_{t_max}^2 I)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ScheduleValues",
    "Schedule",
    "VP",
    "VPLinear",
    "VPCosine",
    "VE",
    "EDM",
    "RectifiedFlow",
    "DiscreteVP",
]


GRIDS = ("log_snr", "tapered", "uniform", "karras")
"""Names of the time grids :meth:`Schedule.time_grid` builds."""
TAPER = 0.8
"""``"tapered"`` grids: logSNR steps from ``1 + TAPER`` (noise end) to ``1 - TAPER`` (data end) times the uniform step."""


@dataclass(frozen=True)
class ScheduleValues:
    """alpha_t, sigma_t and their derivatives at a tensor of times (all the same shape)."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor

    @property
    def f(self) -> Tensor:
        """Drift coefficient ``f(t) = d log(alpha_t) / dt``."""
        return self.d_alpha / self.alpha

    @property
    def g2(self) -> Tensor:
        """Squared diffusion ``g^2(t) = d sigma^2/dt - 2 f sigma^2``."""
        return 2 * self.sigma * (self.d_sigma - self.f * self.sigma)

    @property
    def log_snr(self) -> Tensor:
        """``lambda_t = log(alpha_t^2 / sigma_t^2)``."""
        return 2 * (torch.log(self.alpha) - torch.log(self.sigma))

    def view(self, *shape: int) -> "ScheduleValues":
        """The same values reshaped (e.g. to ``(B, 1, 1, 1)`` for broadcasting)."""
        return ScheduleValues(*(v.reshape(*shape) for v in (self.alpha, self.sigma, self.d_alpha, self.d_sigma)))


class Schedule:
    """Base class of forward processes.

    Subclasses set ``t_min`` and ``t_max`` and implement :meth:`_values`,
    :meth:`log_snr` and :meth:`t_from_log_snr`.
    """

    t_min: float
    t_max: float

    # -- to implement ---------------------------------------------------------------
    def _values(self, t: Tensor) -> ScheduleValues:
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """logSNR at ``t`` (closed form; more accurate than ``self(t).log_snr``)."""
        return self(t).log_snr

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr`."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------
    def __call__(self, t: Tensor | float) -> ScheduleValues:
        """Evaluate at ``t`` (any shape); computed in float64 at least."""
        # Python numbers go straight to float64 (torch.as_tensor would round them to float32)
        t = t if isinstance(t, Tensor) else torch.tensor(t, dtype=torch.float64)
        if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16, torch.float32):
            t = t.to(torch.float64)
        return self._values(t)

    @property
    def log_snr_min(self) -> float:
        return float(self.log_snr(torch.tensor(self.t_max, dtype=torch.float64)))

    @property
    def log_snr_max(self) -> float:
        return float(self.log_snr(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior ``N(0, sigma_T^2 I)``."""
        return float(self(torch.tensor(self.t_max, dtype=torch.float64)).sigma)

    def check_t(self, t: Tensor | float, *, name: str = "t") -> None:
        """Raise ``ValueError`` unless every entry of ``t`` lies in ``[t_min, t_max]``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        tol = 1e-9 * max(1.0, abs(self.t_max))
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} must be finite")
        if (t < self.t_min - tol).any() or (t > self.t_max + tol).any():
            raise ValueError(
                f"{name} must lie in [t_min, t_max] = [{self.t_min:g}, {self.t_max:g}] for {self!r}; "
                f"got values in [{float(t.min()):g}, {float(t.max()):g}]"
            )

    def check_log_snr(self, log_snr: float, *, name: str = "log_snr") -> None:
        """Raise ``ValueError`` unless ``log_snr`` lies in the schedule's logSNR range."""
        lo, hi = self.log_snr_min, self.log_snr_max
        if not (math.isfinite(log_snr) and lo <= log_snr <= hi):
            raise ValueError(f"{name}={log_snr:g} is outside the logSNR range [{lo:.4g}, {hi:.4g}] of {self!r}")

    def transition(self, s: float, t: float) -> tuple[float, float]:
        """``(a, c)`` of the forward kernel ``q(x_t | x_s) = N(a x_s, c I)`` from ``s`` to ``t >= s``.

        ``a = alpha_t / alpha_s`` and ``c = sigma_t^2 - a^2 sigma_s^2 =
        -sigma_t^2 expm1(lambda_t - lambda_s)`` (docs/math.md s.10), computed from the
        logSNR difference so that ``c`` keeps its relative precision for close times.
        Python floats; ``c = 0`` at ``t = s``.
        """
        tt = torch.tensor([float(t), float(s)], dtype=torch.float64)
        sv, lam = self(tt), self.log_snr(tt)
        a = float(sv.alpha[0] / sv.alpha[1])
        c = -float(sv.sigma[0]) ** 2 * math.expm1(float(lam[0] - lam[1]))
        return a, c

    # -- prior ----------------------------------------------------------------------
    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw ``x_T ~ N(0, sigma_T^2 I)`` of the given full shape ``(B, *event_shape)``."""
        z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return z * self.prior_std

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; 0, sigma_T^2 I)`` per sample, float64, shape ``(B,)``."""
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        dim = x.shape[1]
        var = self.prior_std**2
        return -0.5 * (x.square().sum(1) / var + dim * math.log(2 * math.pi * var))

    # -- time grids -----------------------------------------------------------------
    def time_grid(
        self,
        steps: int,
        *,
        spacing: str = "log_snr",
        rho: float = 7.0,
        t_start: float | None = None,
        t_end: float | None = None,
    ) -> Tensor:
        """``steps + 1`` float64 times from ``t_start`` (default ``t_max``) to ``t_end`` (default ``t_min``).

        ``spacing``: ``"uniform"`` in t, ``"log_snr"`` uniform in logSNR, ``"tapered"``
        (logSNR steps that shrink linearly towards the data end, from ``1 + TAPER`` to
        ``1 - TAPER`` times the uniform step: where the density sharpens, docs/sampling.md),
        or ``"karras"`` (uniform in ``sigma_ve^(1/rho)`` with ``sigma_ve = sigma/alpha =
        exp(-lambda/2)``, the EDM grid). The grid runs in whichever direction
        ``t_start -> t_end`` points.
        """
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        t0 = self.t_max if t_start is None else float(t_start)
        t1 = self.t_min if t_end is None else float(t_end)
        self.check_t(torch.tensor([t0, t1], dtype=torch.float64), name="grid end points")
        u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        if spacing == "uniform":
            grid = t0 + (t1 - t0) * u
        elif spacing in ("log_snr", "tapered", "karras"):
            ends = torch.tensor([t0, t1], dtype=torch.float64)
            l0, l1 = self.log_snr(ends)
            if spacing == "log_snr":
                lam = l0 + (l1 - l0) * u
            elif spacing == "tapered":  # the fraction of the logSNR range done, from the noise end
                v = u if l1 > l0 else 1 - u
                w = (1 - TAPER) * v + TAPER * v * (2 - v)
                lam = l0 + (l1 - l0) * (w if l1 > l0 else 1 - w)
            else:
                s0, s1 = torch.exp(-l0 / 2) ** (1 / rho), torch.exp(-l1 / 2) ** (1 / rho)
                lam = -2 * rho * torch.log(s0 + (s1 - s0) * u)
            grid = self.t_from_log_snr(lam)
        else:
            raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(map(repr, GRIDS))}")
        grid[0], grid[-1] = t0, t1  # exact end points despite round-off in the inverse
        return grid


def _f64(x: float) -> Tensor:
    return torch.tensor(x, dtype=torch.float64)


class VP(Schedule):
    """Variance preserving, logSNR linear in ``t`` on ``[0, 1]``: ``alpha^2 = sigmoid(lambda)``.

    ``lambda(t) = log_snr_max + (log_snr_min - log_snr_max) t``; ``sigma^2 = sigmoid(-lambda)``.
    """

    def __init__(self, log_snr_min: float = -10.0, log_snr_max: float = 10.0):
        if not log_snr_min < log_snr_max:
            raise ValueError(f"need log_snr_min < log_snr_max, got {log_snr_min} and {log_snr_max}")
        self.lmin, self.lmax = float(log_snr_min), float(log_snr_max)
        self.t_min, self.t_max = 0.0, 1.0

    def __repr__(self) -> str:
        return f"VP(log_snr_min={self.lmin:g}, log_snr_max={self.lmax:g})"

    def log_snr(self, t: Tensor) -> Tensor:
        return self.lmax + (self.lmin - self.lmax) * t

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return (log_snr - self.lmax) / (self.lmin - self.lmax)

    def _values(self, t: Tensor) -> ScheduleValues:
        lam = self.log_snr(t)
        dlam = self.lmin - self.lmax
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return ScheduleValues(alpha, sigma, 0.5 * alpha * sigma**2 * dlam, -0.5 * sigma * alpha**2 * dlam)


class VPLinear(Schedule):
    """Continuous DDPM / score-SDE VP: ``beta(t) = beta_min + t (beta_max - beta_min)`` on ``[t_min, 1]``.

    ``alpha_t = exp(-B(t)/2)`` with ``B(t) = int_0^t beta``, ``sigma_t^2 = 1 - alpha_t^2``,
    ``f = -beta/2`` and ``g^2 = beta``. ``t_min`` defaults to 1e-5 (score-SDE's likelihood
    cut-off), where ``sigma`` is about 1e-3.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min} and {beta_max}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {t_min}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), 1.0

    def __repr__(self) -> str:
        return f"VPLinear(beta_min={self.beta_min:g}, beta_max={self.beta_max:g}, t_min={self.t_min:g})"

    def _int_beta(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def log_snr(self, t: Tensor) -> Tensor:
        return -torch.log(torch.expm1(self._int_beta(t)))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        c = torch.nn.functional.softplus(-log_snr)  # = B(t)
        db = self.beta_max - self.beta_min
        return 2 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * db * c))

    def _values(self, t: Tensor) -> ScheduleValues:
        big_b = self._int_beta(t)
        beta = self.beta_min + (self.beta_max - self.beta_min) * t
        alpha = torch.exp(-0.5 * big_b)
        sigma = torch.sqrt(-torch.expm1(-big_b))
        return ScheduleValues(alpha, sigma, -0.5 * beta * alpha, 0.5 * beta * alpha**2 / sigma)


class VPCosine(Schedule):
    """Cosine VP: ``alpha_t = cos(pi t / 2)``, ``sigma_t = sin(pi t / 2)``.

    This is the cosine schedule of Nichol & Dhariwal without the small offset
    (``lambda = -2 log tan(pi t / 2)``). ``t`` is restricted to the logSNR range
    ``[log_snr_min, log_snr_max]`` to keep away from the singular end points.
    """

    def __init__(self, log_snr_min: float = -10.0, log_snr_max: float = 10.0):
        if not log_snr_min < log_snr_max:
            raise ValueError(f"need log_snr_min < log_snr_max, got {log_snr_min} and {log_snr_max}")
        self.lmin, self.lmax = float(log_snr_min), float(log_snr_max)
        self.t_min = float(self.t_from_log_snr(_f64(self.lmax)))
        self.t_max = float(self.t_from_log_snr(_f64(self.lmin)))

    def __repr__(self) -> str:
        return f"VPCosine(log_snr_min={self.lmin:g}, log_snr_max={self.lmax:g})"

    def log_snr(self, t: Tensor) -> Tensor:
        return -2 * torch.log(torch.tan(0.5 * math.pi * t))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return (2 / math.pi) * torch.atan(torch.exp(-0.5 * log_snr))

    def _values(self, t: Tensor) -> ScheduleValues:
        a = 0.5 * math.pi * t
        return ScheduleValues(torch.cos(a), torch.sin(a), -0.5 * math.pi * torch.sin(a), 0.5 * math.pi * torch.cos(a))


class VE(Schedule):
    """Variance exploding (score-SDE): ``alpha = 1``, ``sigma_t = sigma_min (sigma_max/sigma_min)^t``, t in [0, 1]."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = 0.0, 1.0
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def __repr__(self) -> str:
        return f"VE(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"

    def log_snr(self, t: Tensor) -> Tensor:
        return -2 * (math.log(self.sigma_min) + self._log_ratio * t)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return (-0.5 * log_snr - math.log(self.sigma_min)) / self._log_ratio

    def _values(self, t: Tensor) -> ScheduleValues:
        sigma = self.sigma_min * torch.exp(self._log_ratio * t)
        return ScheduleValues(torch.ones_like(t), sigma, torch.zeros_like(t), sigma * self._log_ratio)


class EDM(Schedule):
    """EDM (Karras et al. 2022): ``alpha = 1``, ``sigma = t`` on ``[sigma_min, sigma_max]``."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.t_min:g}, sigma_max={self.t_max:g})"

    def log_snr(self, t: Tensor) -> Tensor:
        return -2 * torch.log(t)

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.exp(-0.5 * log_snr)

    def _values(self, t: Tensor) -> ScheduleValues:
        return ScheduleValues(torch.ones_like(t), t, torch.zeros_like(t), torch.ones_like(t))


class RectifiedFlow(Schedule):
    """Rectified flow / linear interpolant: ``alpha = 1 - t``, ``sigma = t``.

    Both ends are singular (sigma = 0 at t = 0 and alpha = 0 at t = 1), so time is
    restricted to ``[t_min, t_max]`` (defaults 1e-3 and 1 - 1e-3). Flow-matching code
    that runs the clock the other way (t = 0 noise) must flip it in its adapter.
    """

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min} and {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def __repr__(self) -> str:
        return f"RectifiedFlow(t_min={self.t_min:g}, t_max={self.t_max:g})"

    def log_snr(self, t: Tensor) -> Tensor:
        return 2 * (torch.log1p(-t) - torch.log(t))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * log_snr)

    def _values(self, t: Tensor) -> ScheduleValues:
        return ScheduleValues(1 - t, t, -torch.ones_like(t), torch.ones_like(t))


class DiscreteVP(Schedule):
    """VP schedule of a discrete-time model (DDPM, DDIM, Stable Diffusion, ...), continuous in between.

    ``alphas_cumprod`` holds ``abar_k`` for the training timesteps ``k = 0, ..., N-1``
    (strictly decreasing in ``(0, 1)``). Time ``t`` in ``[0, N-1]`` *is* the model's
    timestep, fractional between the integers. With ``sigma_ve = sqrt((1 - abar)/abar)
    = exp(-lambda/2)``, ``log sigma_ve`` is interpolated between the steps and
    ``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``; at integer ``t = k``
    this gives ``alpha^2 = abar_k`` and ``sigma^2 = 1 - abar_k`` exactly.

    ``interpolation``:

    * ``"linear"`` (default): ``log sigma_ve`` linear between steps, as k-diffusion's
      ``DiscreteSchedule`` maps sigma to a fractional timestep. ``d lambda/dt`` is
      piecewise constant: at an integer the piece to its right is used (the last one at
      ``N-1``), so finite differences across an integer do not match it.
    * ``"cubic"``: monotone cubic Hermite (Fritsch-Carlson / PCHIP slopes) through the
      same points: continuously differentiable, still strictly monotone.

    Outside ``[0, N-1]`` the end pieces extend linearly, in :meth:`t_from_log_snr` too.
    ``t_min`` / ``t_max`` (default ``0`` and ``N-1``) may restrict the range.
    """

    def __init__(
        self,
        alphas_cumprod,
        *,
        t_min: float | None = None,
        t_max: float | None = None,
        interpolation: str = "linear",
    ):
        if interpolation not in ("linear", "cubic"):
            raise ValueError(f"unknown interpolation {interpolation!r}; expected 'linear' or 'cubic'")
        abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if abar.numel() < 2:
            raise ValueError(f"need at least 2 timesteps, got {abar.numel()}")
        if not (torch.isfinite(abar).all() and (abar > 0).all() and (abar < 1).all()):
            raise ValueError("alphas_cumprod must lie strictly inside (0, 1); clamp a zero-terminal-SNR last value (e.g. to 2**-24)")
        log_sigmas = 0.5 * (torch.log1p(-abar) - torch.log(abar))
        delta = log_sigmas.diff()
        if not (delta > 0).all():
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = abar
        self.log_sigmas = log_sigmas  # log sigma_ve at the integer timesteps, increasing
        self.num_steps = abar.numel()
        self.interpolation = interpolation
        # knot slopes d log sigma_ve / dt: harmonic means of the neighbouring differences
        # (PCHIP on a unit grid; between them, so the cubic stays monotone)
        slopes = torch.cat([delta[:1], 2 / (1 / delta[:-1] + 1 / delta[1:]), delta[-1:]])
        self.knot_slopes = slopes if interpolation == "cubic" else None
        last = float(self.num_steps - 1)
        self.t_min = 0.0 if t_min is None else float(t_min)
        self.t_max = last if t_max is None else float(t_max)
        if not 0 <= self.t_min < self.t_max <= last:
            raise ValueError(f"need 0 <= t_min < t_max <= {last:g}, got {self.t_min} and {self.t_max}")
        self._tables: dict[torch.device, tuple[Tensor, Tensor | None]] = {}

    def __repr__(self) -> str:
        interp = "" if self.interpolation == "linear" else f", interpolation={self.interpolation!r}"
        return f"DiscreteVP(num_steps={self.num_steps}, t_min={self.t_min:g}, t_max={self.t_max:g}{interp})"

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        if device not in self._tables:
            m = None if self.knot_slopes is None else self.knot_slopes.to(device)
            self._tables[device] = (self.log_sigmas.to(device), m)
        return self._tables[device]

    def _segment(self, idx: Tensor, u: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """``log sigma_ve`` and its t-derivative at ``idx + u`` (``u`` in the unit segment or beyond)."""
        ls, m = self._table(device)
        lo, hi = ls[idx], ls[idx + 1]
        if m is None:
            return lo + u * (hi - lo), hi - lo
        m0, m1 = m[idx], m[idx + 1]
        inside = (u >= 0) & (u <= 1)
        w = u.clamp(0, 1)
        w2, w3 = w * w, w * w * w
        y = (2 * w3 - 3 * w2 + 1) * lo + (w3 - 2 * w2 + w) * m0 + (3 * w2 - 2 * w3) * hi + (w3 - w2) * m1
        dy = (6 * w2 - 6 * w) * (lo - hi) + (3 * w2 - 4 * w + 1) * m0 + (3 * w2 - 2 * w) * m1
        # beyond the end knots: straight on with the end slope
        end_slope = torch.where(u < 0, m0, m1)
        y = torch.where(inside, y, y + (u - w) * end_slope)
        return y, torch.where(inside, dy, end_slope)

    def _log_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``log sigma_ve(t)`` and its derivative."""
        idx = torch.floor(t).clamp(0, self.num_steps - 2).long()
        return self._segment(idx, t - idx, t.device)

    def log_snr(self, t: Tensor) -> Tensor:
        return -2 * self._log_sigma(t)[0]

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
        ls, m = self._table(log_snr.device)
        target = -0.5 * log_snr
        idx = (torch.searchsorted(ls, target.contiguous(), right=True) - 1).clamp(0, self.num_steps - 2)
        lo, hi = ls[idx], ls[idx + 1]
        u = (target - lo) / (hi - lo)
        if m is not None:  # Newton on the monotone cubic, from the linear guess
            inside = (u >= 0) & (u <= 1)
            u_end = torch.where(u < 0, (target - lo) / m[idx], 1 + (target - hi) / m[idx + 1])
            w = u.clamp(0, 1)
            for _ in range(30):
                y, dy = self._segment(idx, w, log_snr.device)
                step = (y - target) / dy.clamp_min(1e-300)
                w = (w - step).clamp(0, 1)
                if step.abs().max() <= 1e-15:
                    break
            u = torch.where(inside, w, u_end)
        return idx + u

    def _values(self, t: Tensor) -> ScheduleValues:
        log_sigma, slope = self._log_sigma(t)
        lam, dlam = -2 * log_sigma, -2 * slope
        alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return ScheduleValues(alpha, sigma, 0.5 * alpha * sigma**2 * dlam, -0.5 * sigma * alpha**2 * dlam)
