"""What the ``diffdensity`` subcommands do: each takes the parsed arguments and writes files.

Kept apart from the parser (``cli.py``) so that the same functions can be called from
Python and tested without a shell.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from .likelihood import logp_to_bpd

__all__ = ["demo", "sample", "align", "detail", "train"]


def _setup(args: argparse.Namespace):
    from .zoo import load_model

    torch.manual_seed(args.seed)
    model = load_model(args.model, device=args.device)
    shape = getattr(model, "event_shape", None)
    if shape is None:
        raise ValueError(f"{args.model} does not declare its event shape; cannot draw latents")
    return model, tuple(shape)


def _latents(model, shape, n: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if hasattr(model, "log_prob") else torch.float32
    return model.schedule.prior_sample((n, *shape), generator=g, dtype=dtype).to(device)


class _Progress:
    """A tqdm bar over solver steps, as a ``sample`` callback (one bar per sampler run)."""

    def __init__(self, steps: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, desc=desc, leave=False, unit="step", disable=None)  # off without a terminal

    def __call__(self, info) -> None:
        if info.step > self.bar.n:
            self.bar.update(info.step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _with_progress(draw, desc: str, steps: int, **kwargs):
    bar = _Progress(steps, desc)
    try:
        return draw(callback=bar, steps=steps, **kwargs)
    finally:
        bar.close()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


# -- demo -------------------------------------------------------------------------------


def demo(args: argparse.Namespace) -> int:
    """Samples from the same latents across density-guidance quantiles, plus PF-ODE, SDE and HD."""
    from .images import save_grid
    from .sampling import sample

    model, shape = _setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dim = math.prod(shape)
    x_T = _latents(model, shape, args.n, args.seed, args.device)
    g = lambda k: torch.Generator().manual_seed(args.seed + 1000 + k)  # noqa: E731
    runs = [(f"DG q={q:g}", dict(method="density-guidance", q=q)) for q in args.q]
    runs += [("PF-ODE", dict(method="pf-ode")), ("reverse SDE", dict(method="sde")), ("high density", dict(method="hd", log_snr_threshold=2.0))]
    rows, labels, cells, table, paths, per_sample = [], [], [], [], [], []
    print(f"{'sampler':<16} {'mean log p [nats]':>18} {'mean bits/dim':>14} {'NFE':>28} {'time [s]':>9}")
    for k, (name, opts) in enumerate(runs):
        t0 = time.perf_counter()
        res = _with_progress(sample, name, args.steps, model=model, x_T=x_T.clone(), generator=g(k), **opts)
        dt = time.perf_counter() - t0
        bpd = logp_to_bpd(res.logp, dim)
        rows.append(res.x)
        labels.append(name)
        cells.append([f"{lp:.0f} / {b:.2f}" for lp, b in zip(res.logp.tolist(), bpd.tolist())])
        table.append([name, float(res.logp.mean()), float(bpd.mean()), str(res.nfe), round(dt, 2)])
        per_sample += [[name, j, f"{lp:.6f}", f"{b:.6f}"] for j, (lp, b) in enumerate(zip(res.logp.tolist(), bpd.tolist()))]
        if res.logp_path is not None:
            paths.append((name, res.ts, res.logp_path))
        print(f"{name:<16} {table[-1][1]:>18.1f} {table[-1][2]:>14.3f} {table[-1][3]:>28} {dt:>9.1f}", flush=True)
    grid = save_grid(out / "grid.png", rows, row_labels=labels, cell_labels=cells, title="same latents; labels: log p [nats] / bits per dim")
    _write_csv(out / "table.csv", ["sampler", "mean_logp_nats", "mean_bits_per_dim", "nfe", "seconds"], table)
    _write_csv(out / "samples.csv", ["sampler", "latent", "logp_nats", "bits_per_dim"], per_sample)
    plot = _plot_paths(out / "logp_path.png", paths, model.schedule)
    print(f"wrote {grid}, {plot}, {out / 'table.csv'} and {out / 'samples.csv'}")
    return 0


def _plot_paths(path: Path, paths, schedule) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ts, lp in paths:
        lam = schedule.log_snr(ts.to(torch.float64))
        mean = lp.mean(1)
        ax.plot(lam.tolist(), mean.tolist(), label=name)
    ax.set_xlabel("logSNR (sampling runs left to right)")
    ax.set_ylabel("mean log p_t(x_t) [nats]")
    ax.set_title("log-density along the sampling trajectory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- sample -----------------------------------------------------------------------------


def sample(args: argparse.Namespace) -> int:
    from .images import save_grid, to_uint8
    from .sampling import sample as draw

    model, shape = _setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = {}
    if args.q is not None:
        opts["q"] = args.q
    for key in ("log_snr_threshold", "target_logp", "noise"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.solver is not None:
        opts["solver"] = args.solver
    x_T = _latents(model, shape, args.n, args.seed, args.device)
    res = _with_progress(draw, args.method, args.steps, model=model, x_T=x_T, method=args.method, track_logp=not args.no_track,
                         probes=args.probes, generator=torch.Generator().manual_seed(args.seed + 1), **opts)
    dim = math.prod(shape)
    rows = []
    if len(shape) == 3 and shape[0] in (1, 3):
        from PIL import Image

        imgs = to_uint8(res.x)
        for i, img in enumerate(imgs):
            arr = img.permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(out / f"sample_{i:04d}.png")
        save_grid(out / "grid.png", [res.x[i : i + 8] for i in range(0, len(res.x), 8)])
    for i in range(args.n):
        lp = None if res.logp is None else float(res.logp[i])
        rows.append([f"sample_{i:04d}", "" if lp is None else f"{lp:.6f}", "" if lp is None else f"{float(logp_to_bpd(res.logp[i], dim)):.6f}"])
    _write_csv(out / "samples.csv", ["sample", "logp_nats", "bits_per_dim"], rows)
    mean = "" if res.logp is None else f", mean log p {float(res.logp.mean()):.1f} nats"
    print(f"{args.n} samples with {args.method} ({res.nfe}){mean}; wrote {out}")
    return 0


# -- align ------------------------------------------------------------------------------


def align(args: argparse.Namespace) -> int:
    from .alignment import score_alignment

    model, shape = _setup(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_T = _latents(model, shape, args.n, args.seed, args.device)
    methods = ["with-score", "without-score"] if args.method == "both" else [args.method]
    results = {}
    for m in methods:
        t0 = time.perf_counter()
        r = score_alignment(model, x_T, steps=args.steps, method=m, generator=torch.Generator().manual_seed(args.seed + 1))
        results[m] = r
        print(f"{m:<14} aligned on {r.fraction:.1%} of {args.n} latents  ({r.nfe}, {time.perf_counter() - t0:.1f} s)")
    if len(results) == 2:
        a, b = results["with-score"].values, results["without-score"].values
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        print(f"agreement: correlation {corr:.4f}, same sign on {float((a.sign() == b.sign()).double().mean()):.1%}")
    _write_csv(out / "alignment.csv", ["latent", *methods], [[i, *(f"{float(results[m].values[i]):.6g}" for m in methods)] for i in range(args.n)])
    print(f"wrote {out / 'alignment.csv'}")
    return 0


# -- detail -----------------------------------------------------------------------------


def detail(args: argparse.Namespace) -> int:
    """Log-density versus PNG size, on model samples across quantiles or on an image folder."""
    from .images import correlations, png_size, to_uint8

    model, shape = _setup(args)
    dim = math.prod(shape)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.images:
        import sys

        from .evaluate import list_images, read_image
        from .likelihood import bits_per_dim as bpd_of

        names, arrays = [], []
        for f in list_images(args.images):
            arr, status, msg = read_image(f, shape)
            if arr is None:
                print(f"skipping {f} ({status}): {msg}", file=sys.stderr)
                continue
            names.append(f)
            arrays.append(torch.from_numpy(arr))
        if not arrays:
            raise ValueError(f"no readable {shape} images in {args.images}")
        u8 = torch.stack(arrays)
        res = bpd_of(model, u8, draws=1, steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
        bpd = res.bpd
    else:
        from .sampling import sample as draw

        per = max(1, args.n // 5)
        qs = [0.1, 0.3, 0.5, 0.7, 0.9]
        xs, lps, names = [], [], []
        for k, q in enumerate(qs):
            x_T = _latents(model, shape, per, args.seed + k, args.device)
            r = _with_progress(draw, f"q={q:g}", args.steps, model=model, x_T=x_T, method="density-guidance", q=q,
                               generator=torch.Generator().manual_seed(args.seed + 100 + k))
            xs.append(r.x)
            lps.append(r.logp)
            names += [f"q{q:g}_{i}" for i in range(per)]
        u8 = to_uint8(torch.cat(xs))
        bpd = logp_to_bpd(torch.cat(lps), dim)
    size = png_size(u8)
    pearson, spearman = correlations(bpd, size)
    print(f"{len(size)} images: bits/dim vs PNG bytes: Pearson {pearson:+.3f}, Spearman {spearman:+.3f} "
          f"(log-density vs PNG size: Pearson {-pearson:+.3f}, Spearman {-spearman:+.3f})")
    _write_csv(out / "detail.csv", ["image", "bits_per_dim", "png_bytes"], [[n, f"{float(b):.6f}", int(s)] for n, b, s in zip(names, bpd, size)])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter((-bpd).tolist(), size.tolist(), s=10)
    ax.set_xlabel("log-density [negative bits/dim]")
    ax.set_ylabel("PNG size [bytes]")
    ax.set_title(f"detail vs density: Spearman {-spearman:+.2f}")
    fig.tight_layout()
    fig.savefig(out / "detail.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'detail.csv'} and {out / 'detail.png'}")
    return 0


# -- train ------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> int:
    from .training import train as run

    res = run(args.preset, args.out, resume=not args.restart, max_minutes=args.max_minutes, steps=args.steps, threads=args.threads)
    print(f"step {res.step}/{res.steps}, last loss {res.last_loss:.4f}, {res.total_minutes:.1f} min in total; weights: {res.weights}")
    return 0
