"""Dataset scoring: per-sample seeding, bad inputs, resumption after a crash or a kill, the CLI."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import diffdensity as dd
from diffdensity.cli import logp as logp_cli
from diffdensity.cli import main as cli_main
from diffdensity.scoring import keys as rng
from diffdensity.scoring import score_dataset
from diffdensity.scoring.probes import PerSampleHutchinson
from diffdensity.scoring.inputs import pixel_id
from diffdensity.scoring.rows import COLUMNS

PIL = pytest.importorskip("PIL.Image")

SHAPE = (3, 8, 8)
N_IMAGES = 10
OPTS = dict(steps=4, solver="heun", progress=False, verbose=False)


def make_model() -> dd.GaussianMixture:
    """An exact 3-component mixture of 3x8x8 images (fast; score and JVP in closed form)."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64) * 1.6 - 0.8
    return dd.GaussianMixture(means, 0.3, schedule=dd.VP())


class Counting:
    """Counts the sample rows the score sees; optionally raises after ``fail_after`` calls."""

    def __init__(self, model, fail_after: int | None = None, sleep: float = 0.0):
        self.model, self.schedule, self.event_shape = model, model.schedule, model.event_shape
        self.rows = self.calls = 0
        self.fail_after, self.sleep = fail_after, sleep

    def __repr__(self) -> str:  # the same id as the wrapped model: resuming is allowed
        return repr(self.model)

    def score(self, x, t, **cond):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("injected failure")
        self.calls += 1
        self.rows += x.shape[0]
        if self.sleep:
            time.sleep(self.sleep)
        return self.model.score(x, t, **cond)


CALLS = 2 * OPTS["steps"]  # score calls per batch (and rows per image): Heun, one probe, one draw


def write_images(folder: Path, n: int = N_IMAGES, *, seed: int = 0, size=(8, 8)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        PIL.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def nfe(row: dict) -> int:
    """All network passes of a row."""
    return sum(int(row[f"nfe_{k}"]) for k in ("forward", "jvp", "vjp"))


def assert_same_results(a: list[dict], b: list[dict], tol: float = 1e-9) -> None:
    assert [(r["index"], r["file"], r["status"]) for r in a] == [(r["index"], r["file"], r["status"]) for r in b]
    for x, y in zip(a, b):
        if x["status"] == "ok":
            assert math.isclose(float(x["logp_nats"]), float(y["logp_nats"]), rel_tol=tol, abs_tol=tol), (x, y)
            assert nfe(x) == nfe(y)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def images(tmp_path) -> Path:
    write_images(tmp_path / "imgs")
    return tmp_path / "imgs"


@pytest.fixture
def reference(model, images, tmp_path) -> list[dict]:
    score_dataset(model, images, tmp_path / "reference.csv", **OPTS)
    return read_csv(tmp_path / "reference.csv")


# -- random numbers and probes -----------------------------------------------------------


def test_counter_rng_is_per_sample_and_well_distributed():
    idx = torch.arange(400)
    keys = rng.sample_keys(7, 1, idx, 0)
    sub = rng.sample_keys(7, 1, torch.tensor([391, 5]), 0)
    assert torch.equal(sub, keys[[391, 5]])  # a sample's key ignores the rest of the batch
    assert not torch.equal(rng.sample_keys(8, 1, idx, 0), keys) and not torch.equal(rng.sample_keys(7, 2, idx, 0), keys)
    u = rng.uniform(keys, 500)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() * 12 - 1) < 0.02
    z = rng.normal(keys, 500)
    assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.03
    r = rng.rademacher(keys, 500)
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.02
    pairs = torch.stack([u[:-1].flatten(), u[1:].flatten()])  # neighbouring samples
    assert abs(torch.corrcoef(pairs)[0, 1]) < 0.02


def test_per_sample_hutchinson_ignores_batch_layout():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    fn = lambda x: x.reshape(x.shape[0], -1) @ a.T  # noqa: E731  div = tr(a)
    x = torch.randn(5, 12, dtype=torch.float64, generator=g)
    est = PerSampleHutchinson(2)
    keys = rng.sample_keys(0, rng.STREAM_PROBES, torch.arange(5))

    def run(sel):
        est.reset()
        est.begin_step()
        est.bind(keys[sel])
        return est(fn, x[sel])[1]

    full = run(torch.arange(5))
    assert torch.allclose(run(torch.tensor([3, 1])), full[[3, 1]], rtol=1e-12, atol=1e-12)
    est.reset()
    est.bind(keys)
    first, second = est(fn, x)[1], est(fn, x)[1]  # a second call (the next stage): other probes
    assert torch.equal(first, full) and not torch.equal(second, full)


# -- scoring -----------------------------------------------------------------------------


def test_rows_match_log_likelihood_of_the_dequantised_point(model, images, tmp_path):
    files = [images / "img_000.png", images / "img_003.png"]
    res = score_dataset(model, files, tmp_path / "exact.csv", divergence="exact", **OPTS)
    assert res.exit_code == 0 and res.n_ok == 2 and res.computed == 2
    row = res.rows[1]
    assert row["file"] == str(files[1])
    u = torch.from_numpy(np.array(PIL.open(row["file"]))).permute(2, 0, 1)[None].to(torch.float64)
    assert row["sha256"] == hashlib.sha256(files[1].read_bytes()).hexdigest()
    key = torch.tensor([pixel_id(u[0].to(torch.uint8).numpy())])  # the noise is keyed by the content, not the position
    noise = rng.uniform(rng.sample_keys(0, rng.STREAM_DEQUANT, key, torch.tensor([0])), u.numel())
    x = dd.likelihood.dequantize(u, noise.reshape(u.shape)).float()
    direct = dd.log_likelihood(model, x, steps=4, solver="heun", divergence=dd.Exact(mode="reverse"))
    assert math.isclose(float(row["logp_nats"]), float(direct.logp), rel_tol=1e-12)
    assert math.isclose(float(row["bpd"]), -float(direct.logp) / (x.numel() * math.log(2)) + 7, rel_tol=1e-12)
    assert (int(row["nfe_forward"]), int(row["nfe_jvp"]), int(row["nfe_vjp"])) == (direct.nfe.forward, direct.nfe.jvp, direct.nfe.vjp)
    assert torch.allclose(res.bpd, -res.logp / (x.numel() * math.log(2)) + 7)


@pytest.mark.parametrize("options", [dict(), dict(draws=2, probes=3)])
def test_results_do_not_depend_on_batch_size(model, images, tmp_path, options):
    outs = []
    for bs in (1, 3, N_IMAGES):
        score_dataset(model, images, tmp_path / f"bs{bs}.csv", batch_size=bs, **options, **OPTS)
        outs.append(read_csv(tmp_path / f"bs{bs}.csv"))
    assert outs[0][0]["logp_nats"] != ""
    for other in outs[1:]:
        assert_same_results(outs[0], other)


def test_tensor_dataset_matches_files(model, images, reference, tmp_path):
    data = torch.stack([torch.from_numpy(np.array(PIL.open(p))).permute(2, 0, 1) for p in sorted(images.iterdir())])
    res = score_dataset(model, data, tmp_path / "tensor.csv", **OPTS)
    assert [r["file"] for r in res.rows] == [""] * N_IMAGES
    assert torch.allclose(res.logp, torch.tensor([float(r["logp_nats"]) for r in reference], dtype=torch.float64), rtol=1e-12)
    with pytest.raises(ValueError, match="0, 255"):
        score_dataset(model, data.float() + 0.5, tmp_path / "bad.csv", **OPTS)


def test_bad_images_are_reported_and_skipped(model, images, reference, tmp_path, capsys):
    (images / "img_003b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    PIL.fromarray(np.zeros((9, 8, 3), np.uint8)).save(images / "img_005b.png")  # wrong size
    good = (images / "img_000.png").read_bytes()
    (images / "img_007b.png").write_bytes(good[: len(good) // 2])  # truncated
    res = score_dataset(model, images, tmp_path / "bad.csv", progress=False, steps=4, solver="heun")
    rows = read_csv(tmp_path / "bad.csv")
    assert len(rows) == N_IMAGES + 3 and [int(r["index"]) for r in rows] == list(range(N_IMAGES + 3))
    status = {Path(r["file"]).name: r["status"] for r in rows}
    assert status["img_003b.png"] == "unreadable" and status["img_007b.png"] == "unreadable"
    assert status["img_005b.png"] == "wrong_shape"
    assert sum(s == "ok" for s in status.values()) == N_IMAGES
    assert res.exit_code == 1 and res.n_failed == 3
    ok = [r for r in rows if r["status"] == "ok"]
    # the good images keep their numbers although their positions moved (noise keyed by content)
    assert [r["file"] for r in ok] == [r["file"] for r in reference]
    assert [r["logp_nats"] for r in ok] == [r["logp_nats"] for r in reference]
    err = capsys.readouterr().err
    assert "3 failed" in err and "img_003b.png" in err and "img_005b.png" in err and "8x9" in err


def test_only_fixed_step_solvers_and_checked_options(model, images, tmp_path):
    with pytest.raises(ValueError, match="adaptive"):
        score_dataset(model, images, tmp_path / "a.csv", **{**OPTS, "solver": "dopri5"})
    for bad in (dict(steps=0), dict(probes=0), dict(draws=0), dict(seed=-1), dict(batch_size=0), dict(divergence="x")):
        with pytest.raises(ValueError):
            score_dataset(model, images, tmp_path / "a.csv", **{**OPTS, **bad})


# -- resumption --------------------------------------------------------------------------


def test_crash_then_resume_recomputes_only_missing_rows(model, images, reference, tmp_path):
    out = tmp_path / "run.csv"
    crashing = Counting(model, fail_after=CALLS + 3)  # dies in the 2nd batch of 2
    with pytest.raises(RuntimeError, match="injected"):
        score_dataset(crashing, images, out, batch_size=2, **OPTS)
    assert not out.exists()
    parts = list((tmp_path / "run.csv.parts").glob("rank-*.csv"))
    assert len(parts) == 1 and len(read_csv(parts[0])) == 2  # the first batch is safe on disk

    counting = Counting(model)
    res = score_dataset(counting, images, out, batch_size=2, **OPTS)
    assert res.resumed == 2 and res.computed == N_IMAGES - 2
    assert counting.rows == (N_IMAGES - 2) * CALLS  # finished rows were not recomputed
    assert_same_results(read_csv(out), reference)
    assert not (tmp_path / "run.csv.parts").exists()

    again = Counting(model)  # a complete output: nothing to do
    res = score_dataset(again, images, out, **OPTS)
    assert again.rows == 0 and res.resumed == N_IMAGES and res.exit_code == 0
    assert_same_results(read_csv(out), reference)


def test_torn_trailing_line_is_ignored_and_repaired(model, images, reference, tmp_path):
    out = tmp_path / "torn.csv"
    with pytest.raises(RuntimeError):
        score_dataset(Counting(model, fail_after=2 * CALLS), images, out, batch_size=1, **OPTS)
    part = tmp_path / "torn.csv.parts" / "rank-00000.csv"
    with open(part, "ab") as f:  # a write cut short by a kill
        f.write(f"2,{images / 'img_002.png'},-33".encode())
    counting = Counting(model)
    res = score_dataset(counting, images, out, batch_size=4, **OPTS)
    assert res.resumed == 2 and counting.rows == (N_IMAGES - 2) * CALLS
    rows = read_csv(out)
    assert len(rows) == N_IMAGES and len({r["index"] for r in rows}) == N_IMAGES
    assert_same_results(rows, reference)


def test_changed_settings_refuse_to_resume(model, images, reference, tmp_path):
    out = tmp_path / "reference.csv"
    with pytest.raises(ValueError, match="steps"):
        score_dataset(model, images, out, **{**OPTS, "steps": 5})
    res = score_dataset(model, images, out, overwrite=True, **{**OPTS, "steps": 5})
    assert res.computed == N_IMAGES and read_csv(out)[0]["logp_nats"] != reference[0]["logp_nats"]
    (tmp_path / "foreign.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="meta.json"):
        score_dataset(model, images, tmp_path / "foreign.csv", **OPTS)


def test_probe_basis_is_a_setting(model, images, reference, tmp_path):
    """Pixel probes are another estimate (refused on a DCT file); "dct" is what "auto" takes for images (resumed)."""
    out = tmp_path / "reference.csv"  # the reference's file, scored with the default ("auto")
    again = score_dataset(model, images, out, probe_basis="dct", **OPTS)
    assert again.computed == 0 and again.resumed == N_IMAGES
    with pytest.raises(ValueError, match="probe_basis"):
        score_dataset(model, images, out, probe_basis="pixel", **OPTS)
    pixel = score_dataset(model, images, tmp_path / "pixel.csv", probe_basis="pixel", **OPTS)
    assert pixel.settings["probe_basis"] == "pixels"
    assert all(r["logp_nats"] != p["logp_nats"] for r, p in zip(reference, pixel.rows))
    with pytest.raises(ValueError, match="probe_basis"):
        score_dataset(model, images, tmp_path / "a.csv", probe_basis="fourier", **OPTS)


def test_new_files_in_the_folder_are_scored_on_rerun(model, images, tmp_path):
    out = tmp_path / "grow.csv"
    score_dataset(model, images, out, **OPTS)
    PIL.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(images / "img_999.png")  # sorts last
    counting = Counting(model)
    res = score_dataset(counting, images, out, **OPTS)
    assert res.computed == 1 and res.resumed == N_IMAGES and counting.rows == CALLS
    assert read_csv(out)[-1]["file"].endswith("img_999.png")


_KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_evaluate import Counting, make_model, OPTS
from diffdensity.scoring import score_dataset
torch.set_num_threads(1)
score_dataset(Counting(make_model(), sleep=0.03), {images!r}, {out!r}, batch_size=1, **OPTS)
"""


def test_killed_process_resumes_without_loss(model, images, reference, tmp_path):
    out = tmp_path / "killed.csv"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), images=str(images), out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "killed.csv.parts" / "rank-00000.csv"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists() and part.read_bytes().count(b"\n") >= 4:  # header + 3 rows
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    data = part.read_bytes()
    done = len(read_csv(part))
    assert 3 <= done < N_IMAGES

    counting = Counting(model)
    res = score_dataset(counting, images, out, batch_size=3, **OPTS)
    assert res.resumed == done and res.computed == N_IMAGES - done
    assert counting.rows == (N_IMAGES - done) * CALLS
    rows = read_csv(out)
    assert [int(r["index"]) for r in rows] == list(range(N_IMAGES))  # no duplicates, none missing
    assert_same_results(rows, reference)
    assert all(line.count(b",") >= len(COLUMNS) - 1 for line in data.split(b"\n")[1:-1])  # whole lines only


# -- command line ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffdensity")
    logp_cli.register(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_logp(tmp_path, capsys):
    folder = tmp_path / "patches"
    write_images(folder, 4, size=(16, 16))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    PIL.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "gray.png")  # another size than the model's
    out = tmp_path / "scores.csv"
    argv = ["logp", str(folder), "--model", "gmm:image16", "--out", str(out), "--steps", "3", "--solver", "euler", "--probes", "1", "--quiet"]
    args = _parser().parse_args(argv)
    assert args.func(args) == 1
    rows = read_csv(out)
    assert [r["status"] for r in rows] == ["unreadable", "wrong_shape", "ok", "ok", "ok", "ok"]
    assert nfe(rows[2]) == 3 + 1  # one product per Euler step, one more on the first for its standard error
    assert all(float(r["logp_se_nats"]) > 0 for r in rows[2:])
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "gray.png" in err and "2 failed" in err

    assert cli_main([*argv, "--steps", "4"]) == 2  # other settings than the existing output
    assert "--overwrite" in capsys.readouterr().err

    sub = _parser()._subparsers._group_actions[0].choices["logp"].format_help()
    pixel = tmp_path / "pixel.csv"
    assert cli_main([*argv, "--probe-basis", "pixel", "--out", str(pixel)]) == 1
    assert json.loads(pixel.with_name("pixel.csv.meta.json").read_text())["settings"]["probe_basis"] == "pixels"
    assert [r["logp_nats"] for r in read_csv(pixel)][2:] != [r["logp_nats"] for r in rows[2:]]
    assert "examples:" in sub and "torchrun" in sub and "(default: 24)" in sub and "{euler,heun,midpoint,rk4}" in sub
    for bad in (["--steps", "0"], ["--solver", "dopri5"], ["--seed", "-3"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["logp", str(folder), *bad])
