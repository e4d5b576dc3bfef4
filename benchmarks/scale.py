"""Throughput of dataset scoring (`diffdensity logp`) with 1 and 2 processes on this machine.

Scores the same folder of random 16x16 RGB PNGs with the bundled ``patches16`` U-Net
(a randomly initialised U-Net of the same architecture if the weights are missing:
the cost is the same), once per process count, alternating the counts over
``--repeats`` rounds so that both see the same background load. Every run is a real
``torchrun --standalone --nproc_per_node=P`` job of CPU processes (gloo) with one
thread each. The per-sample cost (Heun steps, each a vector-Jacobian product through
the U-Net) dominates, so the ideal speed-up is the number of cores.

Reported per process count: samples/second of the scoring itself (median over
rounds; from the first batch to the merged output, after a warm-up solve in each
process), the wall time of the whole command (interpreter start, torch import and
rendezvous included), the speed-up over one process, and the largest difference of
the per-image log-densities from the one-process run (should be ~0: per-sample
seeding makes the results independent of the number of processes).

On a machine shared with other work the wall-clock speed-up says more about the
neighbours than about the code, so the CPU time each process spends in the scoring
call is recorded too: ``CPU s`` (summed over processes; equal to the one-process value
when splitting the work adds no overhead) and the ``idle-core speed-up``, the
one-process CPU time divided by the largest per-process CPU time, i.e. the speed-up
to expect when every process has a core to itself.

    python benchmarks/scale.py                          # 64 images, 8 Heun steps, 1 and 2 processes
    python benchmarks/scale.py --images 96 --repeats 3  # steadier numbers
    python benchmarks/scale.py --procs 1 2 4 --device cuda   # on a machine with GPUs (NCCL)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_model(device: str):
    from diffdensity.bundled.pretrained import load_pretrained

    try:
        return load_pretrained("patches16", device=device), "builtin:patches16"
    except (ValueError, FileNotFoundError, ImportError):
        from diffdensity.models import ScoreModel
        from diffdensity.bundled.nets import UNet
        from diffdensity.schedules import VP

        torch.manual_seed(0)
        net = UNet().eval().requires_grad_(False).to(device)
        for p in net.parameters():  # zero-initialised output layer: give it weights so the work is real
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
        return ScoreModel(net, VP(), parametrization="eps", event_shape=(3, 16, 16)), "random UNet (patches16 architecture)"


def worker(a: argparse.Namespace) -> None:
    """One rank of a ``torchrun`` job: warm up, score the folder, rank 0 writes the timing."""
    from diffdensity.scoring import score_dataset
    from diffdensity.divergence import Hutchinson
    from diffdensity.likelihood import log_likelihood

    torch.set_num_threads(a.threads)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if a.device == "cuda" else a.device
    model, name = make_model(device)
    opts = dict(steps=a.steps, solver="heun", batch_size=a.batch_size, device=a.device, progress=False, verbose=False)
    # first-call costs of this process (forward-AD setup), outside the timing; not through
    # score_dataset(), which is a collective call under torchrun
    log_likelihood(model, torch.zeros(1, 3, 16, 16, device=device), steps=1, divergence=Hutchinson(mode="reverse"))
    cpu0 = time.process_time()
    res = score_dataset(model, a.folder, a.out, overwrite=True, **opts)
    Path(f"{a.out}.rank{rank}.cpu").write_text(repr(time.process_time() - cpu0))
    if rank == 0:
        timing = dict(seconds=res.seconds, computed=res.computed, world=res.world_size, model=name)
        Path(a.out + ".timing.json").write_text(json.dumps(timing))


def _worker_cmd(folder: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return [
        __file__, "--worker", "--folder", str(folder), "--out", str(out), "--steps", str(a.steps),
        "--batch-size", str(a.batch_size), "--device", a.device, "--threads", str(a.threads),
    ]  # fmt: skip


def _read(out: Path) -> dict:
    timing = json.loads(Path(str(out) + ".timing.json").read_text())
    with open(out, newline="") as f:
        timing["logp"] = [float(r["logp_nats"]) for r in csv.DictReader(f)]
    timing["rate"] = timing["computed"] / timing["seconds"]
    timing["cpu"] = [float(Path(f"{out}.rank{r}.cpu").read_text()) for r in range(timing["world"])]
    return timing


def run_job(procs: int, folder: Path, out: Path, a: argparse.Namespace) -> dict:
    """One ``torchrun`` job with ``procs`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *_worker_cmd(folder, out, a)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"torchrun with {procs} processes failed:\n{proc.stderr[-4000:]}")
    return dict(_read(out), wall=wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="images to score")
    p.add_argument("--steps", type=int, default=8, help="Heun steps per image")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (the same for every process count)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--repeats", type=int, default=2, help="rounds (process counts alternate within each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(a.images):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        runs: dict[int, list[dict]] = {n: [] for n in a.procs}
        for r in range(a.repeats):
            order = a.procs if r % 2 == 0 else a.procs[::-1]
            for n in order:
                res = run_job(n, folder, tmp / f"out-{n}-{r}.csv", a)
                runs[n].append(res)
                print(f"round {r + 1}: {n} process(es): {res['rate']:.2f} samples/s ({res['seconds']:.1f} s scoring, "
                      f"{res['wall']:.1f} s wall)", flush=True)  # fmt: skip

    cpu = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    base = statistics.median(x["rate"] for x in runs[a.procs[0]])
    ref = runs[a.procs[0]][0]["logp"]
    print(f"\n{a.images} images of 3x16x16, {runs[a.procs[0]][0]['model']}, Heun {a.steps} steps (1 probe), batch "
          f"{a.batch_size}, {a.threads} thread(s) per process, device {a.device}; {cpu} CPUs, load average {load:.1f}")  # fmt: skip
    cpu_base = statistics.median(sum(x["cpu"]) for x in runs[a.procs[0]])
    head = f"{'processes':>9} {'samples/s':>10} {'speed-up':>9} {'wall s':>7} {'max |dlogp|':>12} {'CPU s':>7} {'idle-core speed-up':>19}"
    print(head)
    summary = []
    for n in a.procs:
        sps = statistics.median(x["rate"] for x in runs[n])
        wall = statistics.median(x["wall"] for x in runs[n])
        diff = max(abs(u - w) for x in runs[n] for u, w in zip(x["logp"], ref))
        cpu_total = statistics.median(sum(x["cpu"]) for x in runs[n])
        bound = statistics.median(cpu_base / max(x["cpu"]) for x in runs[n])
        row = dict(processes=n, samples_per_second=sps, speedup=sps / base, wall=wall, max_abs_logp_diff=diff,
                   cpu_seconds=cpu_total, idle_core_speedup=bound)  # fmt: skip
        line = f"{n:>9d} {sps:>10.2f} {sps / base:>8.2f}x {wall:>7.1f} {diff:>12.2e} {cpu_total:>7.1f} {bound:>18.2f}x"
        summary.append(row)
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(settings=vars(a), cpus=cpu, load=load, results=summary), indent=2))


if __name__ == "__main__":
    main()
