"""Figures and image helpers of the command line: model space ``[-1, 1]`` <-> 8-bit, PNG sizes,
labelled grids, the log-density path plot and the detail scatter plot."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["to_uint8", "png_size", "save_grid", "save_png", "plot_paths", "plot_detail", "correlations"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_uint8(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` in ``[-1, 1]`` -> uint8 in ``[0, 255]`` (clamped, rounded)."""
    return ((x.detach().to(torch.float64).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _pil(img: Tensor):
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def save_png(path: str | Path, img: Tensor) -> Path:
    """Save one uint8 image ``(C, H, W)`` (C = 1 or 3) as a PNG file."""
    _pil(img).save(path)
    return Path(path)


def png_size(images: Tensor) -> Tensor:
    """Bytes of each uint8 image ``(B, C, H, W)`` as a maximally compressed PNG: a measure of detail."""
    sizes = []
    for img in images:
        buf = io.BytesIO()
        _pil(img).save(buf, format="PNG", optimize=True, compress_level=9)
        sizes.append(buf.tell())
    return torch.tensor(sizes, dtype=torch.float64)


def save_grid(
    path: str | Path,
    rows: Sequence[Tensor],
    *,
    row_labels: Sequence[str] | None = None,
    cell_labels: Sequence[Sequence[str]] | None = None,
    scale: int = 4,
    title: str | None = None,
) -> Path:
    """Save rows of images (each ``(N, C, H, W)`` in ``[-1, 1]``) as one labelled PNG grid.

    Images are upscaled ``scale`` times with nearest neighbours so small patches stay
    legible; labels go left of each row and under each cell (matplotlib).
    """
    plt = _pyplot()
    n_rows, n_cols = len(rows), max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    label_lines = 0 if cell_labels is None else max(str(c).count("\n") + 1 for row in cell_labels for c in row)
    title_lines = 0 if not title else title.count("\n") + 1
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(n_cols * max(w * scale / 64, 0.75) + 1.5, n_rows * (h * scale / 64 + 0.15 + 0.14 * label_lines) + 0.25 * title_lines), squeeze=False
    )
    for i, row in enumerate(rows):
        imgs = to_uint8(row)
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < imgs.shape[0]:
                arr = imgs[j].permute(1, 2, 0).numpy()
                ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None, interpolation="nearest")
                if cell_labels is not None:
                    ax.set_xlabel(cell_labels[i][j], fontsize=6.5, linespacing=1.0)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        import textwrap

        width = max(30, int(fig.get_figwidth() * 13))
        title = "\n".join(textwrap.fill(line, width) for line in title.split("\n"))
        fig.set_figheight(fig.get_figheight() + 0.16 * (title.count("\n") + 1 - title_lines))
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def rank(x: Tensor) -> Tensor:
    """Ranks of a 1-D tensor (ties get their average rank), float64."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):  # average over ties
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def correlations(a: Tensor, b: Tensor) -> tuple[float, float]:
    """``(pearson, spearman)`` correlation of two 1-D samples; NaN for fewer than 3 values or a constant one."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    if len(a) < 3 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return math.nan, math.nan
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    spearman = float(torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1])
    return pearson, spearman




def plot_paths(path: Path, paths, schedule, dim: int) -> Path:
    """Bits/dim of ``log p_t(x_t)`` against logSNR for each ``(name, ts (K,), logp_path (K, B))``:
    the mean over samples as a line and the 10-90 % range across samples as a band.

    Bits/dim here is ``-log p_t / (D ln 2) + 7``, the 8-bit scale of the final samples
    applied along the path (docs/math.md s.7); higher log-density is lower on the plot.
    """
    from ..likelihood import logp_to_bpd

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = ["-", "--", "-.", ":"]
    for k, (name, ts, lp) in enumerate(paths):
        lam = schedule.log_snr(ts.to(torch.float64)).tolist()
        bpd = logp_to_bpd(lp.to(torch.float64), dim)
        lo, hi = torch.quantile(bpd, torch.tensor([0.1, 0.9], dtype=torch.float64), dim=1)
        line = ax.plot(lam, bpd.mean(1).tolist(), styles[k % len(styles)], label=name, linewidth=1.4, zorder=3)[0]
        if bpd.shape[1] > 1:
            ax.fill_between(lam, lo.tolist(), hi.tolist(), color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel("logSNR (sampling runs left to right, from noise to data)")
    ax.set_ylabel("bits/dim of log p_t(x_t)  (lower = more likely)")
    ax.set_title("tracked log-density along sampling: mean (line), 10-90 % of samples (band)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_detail(path: Path, bpd: Tensor, size: Tensor, spearman: float) -> Path:
    """Scatter of log-density (negative bits/dim) against PNG size."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter((-bpd).tolist(), size.tolist(), s=10)
    ax.set_xlabel("log-density [negative bits/dim] (right: more likely)")
    ax.set_ylabel("PNG size [bytes] (more detail: larger)")
    rho = "n/a (fewer than 3 images or constant values)" if spearman != spearman else f"{-spearman:+.2f}"
    ax.set_title(f"detail vs density: Spearman {rho}", fontsize=10)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=5, integer=axis is ax.yaxis))
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        axis.set_major_formatter(fmt)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
