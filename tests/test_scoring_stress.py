"""Stress: ``score_dataset`` runs killed at random times, repeated, with inputs changed, added and
left out, and two runs at once, lose no row and keep no stale one."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from diffdensity.scoring import score_dataset
from diffdensity.scoring.rows import problem, settings_digest

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import OPTS, make_model, read_csv  # noqa: E402

PIL = pytest.importorskip("PIL.Image")

_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_evaluate import Counting, make_model, OPTS
from diffdensity.scoring import score_dataset
torch.set_num_threads(1)
score_dataset(Counting(make_model(), sleep=0.01), sys.argv[2:], sys.argv[1], batch_size=1, **OPTS)
"""


def _image(path: Path, rng: np.random.Generator) -> None:
    PIL.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def _wait_for_rows(part: Path, n: int, proc: subprocess.Popen) -> None:
    """Until the part file holds ``n`` rows (or the run ended)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists() and part.read_bytes().count(b"\n") >= n + 1:
            return
        time.sleep(0.01)


def _check_file(out: Path, digest: str, ever: set[str]) -> set[str]:
    """Invariants of the output after any run: sealed rows, no duplicates, no file ever lost."""
    if not out.exists():
        assert not ever
        return ever
    rows = read_csv(out)
    assert all(problem(r, digest) is None for r in rows)
    files = [r["file"] for r in rows]
    assert len(set(files)) == len(files) and len({r["index"] for r in rows}) == len(rows)
    assert ever <= set(files), f"rows lost: {ever - set(files)}"
    return set(files)


def test_random_kills_changes_and_concurrent_runs_lose_no_row(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = [folder / f"img_{i:02d}.png" for i in range(6)]
    for p in paths:
        _image(p, rng)
    out = tmp_path / "stress.csv"
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    digest = None
    ever: set[str] = set()
    interrupted = 0  # kills that left a part file behind (a run cut short while scoring)
    for round, action in enumerate(["kill", "change", "add", "subset", "concurrent", "kill"]):
        if action == "change":  # same name, other bytes
            _image(paths[int(rng.integers(len(paths)))], rng)
        if action == "add":
            paths.append(folder / f"img_new{round}.png")
            _image(paths[-1], rng)
        inputs = [str(p) for p in paths]
        if action == "subset":
            inputs = inputs[1::2]
        n_procs = 2 if action == "concurrent" else 1
        procs = [
            subprocess.Popen([sys.executable, str(script), str(out), *inputs], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(n_procs)
        ]
        if action in ("kill", "change"):
            _wait_for_rows(tmp_path / "stress.csv.parts" / "rank-00000.csv", int(rng.integers(1, 4)), procs[0])
            time.sleep(float(rng.uniform(0, 0.1)))  # anywhere in the next batch, its write or the merge
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(timeout=120)
                    interrupted += (tmp_path / "stress.csv.parts").exists()
        for p in procs:
            p.wait(timeout=120)
            err = p.stderr.read().decode()
            p.stderr.close()
            assert p.returncode in (0, -signal.SIGKILL) or "another run" in err, err
        if digest is None and (tmp_path / "stress.csv.meta.json").exists():
            import json

            digest = settings_digest(json.loads((tmp_path / "stress.csv.meta.json").read_text())["settings"])
        if digest is not None:
            ever = _check_file(out, digest, ever)

    assert interrupted >= 1
    final = score_dataset(make_model(), [str(p) for p in paths], out, batch_size=2, **OPTS)
    digest = settings_digest(final.settings)
    ever = _check_file(out, digest, ever)
    assert {str(p) for p in paths} <= ever and final.n_ok == len(paths)
    ref = score_dataset(make_model(), [str(p) for p in paths], tmp_path / "ref.csv", **OPTS)  # from scratch
    for row, want, p in zip(final.rows, ref.rows, paths):
        assert row["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()  # nothing stale
        assert row["logp_nats"] == want["logp_nats"]
