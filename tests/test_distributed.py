"""Several gloo processes on CPU: same output as one process; a dead rank loses no rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffdensity.scoring import score_dataset
from diffdensity.zoo import gmm_preset

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import CALLS, N_IMAGES, OPTS, Counting, assert_same_results, make_model, read_csv, write_images  # noqa: E402

# fork skips re-importing torch in the children (seconds on a busy machine); spawn elsewhere
START = "fork" if sys.platform == "linux" else "spawn"

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")


def test_torchrun_two_gloo_ranks_match_one_process(tmp_path):
    folder = tmp_path / "patches"
    write_images(folder, 7, size=(16, 16))
    (folder / "corrupt.png").write_bytes(b"garbage")
    out = tmp_path / "two.csv"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "diffdensity", "logp", str(folder), "--model", "gmm:image16", "--out", str(out),
        "--steps", "3", "--solver", "euler", "--device", "cpu", "--batch-size", "2", "--quiet",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr  # the corrupt file makes the job fail after scoring the rest
    assert "corrupt.png" in proc.stderr and "1 failed" in proc.stderr
    meta = json.loads((tmp_path / "two.csv.meta.json").read_text())
    assert meta["world_size"] == 2 and meta["state"] == "complete"

    ref = tmp_path / "one.csv"
    res = score_dataset(gmm_preset("image16"), folder, ref, steps=3, solver="euler", batch_size=5, progress=False, verbose=False)
    assert res.world_size == 1 and res.n_ok == 7
    two, one = read_csv(out), read_csv(ref)
    assert [int(r["index"]) for r in two] == list(range(8))
    assert_same_results(two, one)


def _worker(rank: int, init_file: str, folder: str, out: str, fail_rank: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = make_model()
    if rank == fail_rank:
        model = Counting(model, fail_after=CALLS + 1)  # dies during its second image
    score_dataset(model, folder, out, batch_size=1, **OPTS)
    dist.destroy_process_group()


def test_dead_rank_loses_no_rows_and_rerun_resumes(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder)
    out = tmp_path / "scores.csv"
    score_dataset(make_model(), folder, tmp_path / "ref.csv", **OPTS)  # reference; warms up forward AD for the forks
    with pytest.raises(mp.ProcessRaisedException, match="injected"):
        mp.start_processes(_worker, args=(str(tmp_path / "store"), str(folder), str(out), 1), nprocs=2, start_method=START)
    parts = sorted((tmp_path / "scores.csv.parts").glob("rank-*.csv"))
    assert [p.name for p in parts] == ["rank-00000.csv", "rank-00001.csv"]
    done = {r["index"] for p in parts for r in read_csv(p)}
    assert "1" in done  # rank 1's first image (index 1) survived its death

    model = make_model()
    counting = Counting(model)
    res = score_dataset(counting, folder, out, batch_size=4, **OPTS)  # resumed by one process
    assert res.resumed == len(done) and res.computed == N_IMAGES - len(done)
    assert counting.rows == (N_IMAGES - len(done)) * CALLS
    rows = read_csv(out)
    assert [int(r["index"]) for r in rows] == list(range(N_IMAGES))
    assert_same_results(rows, read_csv(tmp_path / "ref.csv"))
