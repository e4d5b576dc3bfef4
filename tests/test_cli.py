"""The command line, end to end on exact mixtures (fast, offline)."""

import csv
import json
import math

import pytest
import torch

from diffdensity.cli import main
from diffdensity.cli.figures import to_uint8


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sample_writes_images_and_log_densities(tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--model", "gmm:image16", "-n", "4", "--steps", "8", "--out", str(out), "--method", "density-guidance", "--q", "0.7"]) == 0
    table = rows(out / "samples.csv")
    assert len(table) == 4 and all(math.isfinite(float(r["logp_nats"])) for r in table)
    assert (out / "grid.png").stat().st_size > 0 and (out / "sample_0003.png").exists()


DEMO = ["demo", "--model", "gmm:image16", "--n", "3", "--steps", "16", "--q", "0.1", "0.5", "0.9"]
CHECK_COLUMNS = ["checked_samples", "median_abs_gap_nats", "max_abs_gap_nats", "median_gap_stderr_nats", "tracking_biased"]


@pytest.fixture
def quick_reencoding(monkeypatch):
    """The demo's re-encoding with few steps: these tests check its wiring, not its accuracy."""
    from diffdensity.cli import demo

    monkeypatch.setattr(demo, "REENCODING", {"steps": 8})


def test_demo_orders_log_density_by_quantile(tmp_path, capsys, quick_reencoding):
    out = tmp_path / "demo"
    assert main([*DEMO, "--out", str(out)]) == 0
    table = rows(out / "table.csv")
    by_name = {r["sampler"]: float(r["mean_logp_nats"]) for r in table}
    assert by_name["DG q=0.1"] < by_name["DG q=0.5"] < by_name["DG q=0.9"]
    assert {"PF-ODE", "reverse SDE", "SDE to logSNR 3", "high density"} <= set(by_name)
    for name in ("grid.png", "logp_path.png", "samples.csv"):
        assert (out / name).stat().st_size > 0
    assert "DG q=0.9" in capsys.readouterr().out


def test_demo_reencodes_the_first_samples_of_every_row(tmp_path, capsys, quick_reencoding):
    out = tmp_path / "demo"
    assert main([*DEMO, "--check", "2", "--out", str(out)]) == 0
    table = rows(out / "table.csv")
    assert len(table) == 7 and set(CHECK_COLUMNS) <= set(table[0])
    for r in table:
        med, mx, se = (float(r[c]) for c in CHECK_COLUMNS[1:4])
        assert r["checked_samples"] == "2" and all(map(math.isfinite, (med, mx, se))) and 0 <= med <= mx and se > 0
        assert r["tracking_biased"] in ("yes", "no")
    samples = rows(out / "samples.csv")
    checked = [s for s in samples if s["reencoded_logp_nats"]]
    assert len(checked) == 14 and all(int(s["latent"]) < 2 for s in checked)
    for s in checked:  # gap = tracked - re-encoded, each finite
        assert math.isclose(float(s["gap_nats"]), float(s["logp_nats"]) - float(s["reencoded_logp_nats"]), abs_tol=1e-5)
    for r in table:  # the flag follows from the per-sample gaps (median: the lower middle value, as torch's)
        gaps = sorted(abs(float(s["gap_nats"])) for s in checked if s["sampler"] == r["sampler"])
        ses = sorted(float(s["gap_stderr_nats"]) for s in checked if s["sampler"] == r["sampler"])
        assert (r["tracking_biased"] == "yes") == (gaps[0] > 3 * ses[0])
    summary = json.loads((out / "table.json").read_text())
    assert summary["reencoding"]["steps"] == 8 and len(summary["samplers"]["PF-ODE"]["consistency"]["reencoded_logp_nats"]) == 2
    text = capsys.readouterr().out
    assert "re-encoded the first 2 samples" in text
    lines = [ln for ln in text.splitlines() if "tracked off by" in ln or "consistent (within" in ln]
    assert [ln.split("  ")[0].strip() for ln in lines] == [r["sampler"] for r in table]


def test_demo_check_0_disables_the_reencoding(tmp_path, capsys, monkeypatch):
    from diffdensity import consistency

    monkeypatch.setattr(consistency, "log_likelihood", lambda *a, **k: pytest.fail("--check 0 re-encoded"))
    out = tmp_path / "demo"
    assert main([*DEMO, "--check", "0", "--out", str(out)]) == 0
    table = rows(out / "table.csv")
    assert set(CHECK_COLUMNS) <= set(table[0]) and all(r[c] == "" for r in table for c in CHECK_COLUMNS)
    assert all(s["reencoded_logp_nats"] == "" for s in rows(out / "samples.csv"))
    assert json.loads((out / "table.json").read_text())["reencoding"] is None
    assert "re-encoded" not in capsys.readouterr().out


def test_demo_marks_a_row_only_when_its_median_gap_exceeds_3_stderr():
    from types import SimpleNamespace

    from diffdensity.cli.demo import Run, cell_label
    from diffdensity.consistency import ConsistencyReport

    def run_with(gap, se):
        gap, se = torch.tensor(gap, dtype=torch.float64), torch.tensor(se, dtype=torch.float64)
        res = SimpleNamespace(logp=torch.full((3,), 1000.0, dtype=torch.float64), logp_stderr=torch.full((3,), 2.0, dtype=torch.float64))
        check = ConsistencyReport(torch.arange(2), res.logp[:2], res.logp[:2] - gap, gap, se, res.logp_stderr[:2], se / 2)
        return Run("R", res, torch.zeros(3, dtype=torch.float64), 1.0, check)

    off = run_with([80.0, 76.0], [5.0, 5.0])
    assert off.biased and "~+76 nats" in off.row_label() and off.check_columns()[-1] == "yes"
    assert not run_with([80.0, 14.0], [5.0, 5.0]).biased  # median |gap| 14 <= 3 x 5
    assert run_with([-80.0, -76.0], [5.0, 5.0]).row_label().count("~-76") == 1
    fine = run_with([2.0, -1.0], [5.0, 5.0])
    assert not fine.biased and fine.row_label() == "R" and fine.check_columns()[-1] == "no"
    cells = fine.cell_labels()
    assert cells[0].startswith("tracked 1000+-2\nre-enc 998+-2.5") and cells[2] == cell_label(1000.0, 2.0, 0.0)


def test_sample_target_mode_can_steer_by_re_encoding(tmp_path):
    out = tmp_path / "t"
    args = ["sample", "--model", "gmm:mix64", "-n", "2", "--steps", "8", "--method", "density-guidance", "--target-logp", "100"]
    assert main([*args, "--target-measure", "reencoded", "--out", str(out)]) == 0
    summary = json.loads((out / "samples.json").read_text())
    assert "re-encoded" in json.dumps(summary)
    assert all(float(r["logp_stderr_nats"]) > 0 for r in rows(out / "samples.csv"))
    assert main(["sample", "--model", "gmm:mix64", "-n", "2", "--method", "pf-ode", "--target-measure", "reencoded", "--out", str(tmp_path / "u")]) == 2


def test_align_reports_both_methods(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["align", "--model", "gmm:mix64", "-n", "4", "--steps", "8", "--out", str(out)]) == 0
    assert len(rows(out / "alignment.csv")) == 4
    text = capsys.readouterr().out
    assert "same sign on" in text and "n/a" not in text and "nats" in text and "within 2 combined errors on 100.0%" in text
    table = rows(out / "alignment.csv")
    assert {"with_score_aligned", "without_score_aligned", "with_score_error_nats", "without_score_error_nats"} <= set(table[0])
    assert all(float(r["without_score_error_nats"]) > 0 for r in table)


def test_detail_on_an_image_folder_skips_bad_files(tmp_path, capsys):
    from PIL import Image

    from diffdensity.zoo import gmm_preset

    gmm = gmm_preset("image16")
    x = gmm.sample(6, generator=torch.Generator().manual_seed(0))
    imgs = to_uint8(x * torch.linspace(0.05, 1, 6, dtype=x.dtype).view(-1, 1, 1, 1))  # less contrast: smaller PNG files
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(imgs):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "d"
    assert main(["detail", "--model", "gmm:image16", "--images", str(folder), "--steps", "8", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "Spearman" in captured.out and "nan" not in captured.out
    assert len(rows(out / "detail.csv")) == 6 and (out / "detail.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--q", "1.5"],
        ["sample", "-n", "0"],
        ["demo", "--steps", "-3"],
        ["align", "--method", "sideways"],
    ],
)
def test_bad_options_exit_with_usage_error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--model", "nope:x", "--out", str(tmp_path)]) == 2
    assert "unknown model specification" in capsys.readouterr().err


def test_version_and_fast_help_paths(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("diffdensity ")
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    from diffdensity.sampling import METHODS

    assert all(m in text for m in METHODS if m != "custom") and "custom" not in text.split("--method {")[1].split("}")[0]


def test_help_lists_every_command_with_a_description(capsys):
    from diffdensity.cli import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert text.count("\n\n") >= 2, name  # usage, description, options


@pytest.mark.parametrize(
    "argv, code, words",
    [
        (["sample", "--device", "bogus"], 2, ["--device", "bogus", "cpu"]),
        (["sample", "--q", "0.5"], 2, ["--q", "pf-ode", "density-guidance"]),
        (["sample", "--method", "stochastic-density-guidance"], 2, ["needs --q"]),
        (["sample", "--method", "custom"], 2, ["--method", "invalid choice"]),
        (["sample", "--q", "1.5"], 2, ["--q", "between 0 and 1"]),
        (["train", "--preset", "huge"], 2, ["--preset", "patches16"]),
        (["detail", "--model", "gmm:mix64"], 2, ["--model gmm:mix64", "image model"]),
    ],
)
def test_errors_are_one_line_naming_the_flag(argv, code, words, capsys):
    try:
        rc = main(argv + ["--model", "gmm:mix64"] if argv[0] == "sample" else argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == code and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_cuda_without_cuda_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["sample", "--model", "gmm:mix64", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err and len(err.strip().splitlines()) == 1


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    assert main(["sample", "--model", "gmm:mix64", "-n", "2", "--steps", "2", "--out", str(f)]) == 2
    assert "--out" in capsys.readouterr().err and f.read_text() == "keep me"
    unwritable = "/proc/diffdensity-test/out"  # no folder can be created under /proc, not even by root
    assert main(["sample", "--model", "gmm:mix64", "-n", "2", "--steps", "2", "--out", unwritable]) == 2
    err = capsys.readouterr().err
    assert f"--out {unwritable}" in err and "writable" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback():
    from diffdensity.cli.common import CliError

    with pytest.raises(CliError, match="--model nope:x"):
        main(["sample", "--model", "nope:x", "--debug"])


def test_resampling_fewer_removes_stale_images_and_keeps_latents(tmp_path):
    out = tmp_path / "s"
    base = ["sample", "--model", "gmm:image16", "--steps", "4", "--out", str(out), "--no-track"]
    assert main(base + ["-n", "4"]) == 0
    first = (out / "sample_0001.png").read_bytes()
    assert main(base + ["-n", "2"]) == 0
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_0000.png", "sample_0001.png"]
    assert len(rows(out / "samples.csv")) == 2 and (out / "sample_0001.png").read_bytes() == first  # latent i does not depend on -n


def test_outputs_have_numeric_pass_counts_units_and_a_json_summary(tmp_path):
    import json

    out = tmp_path / "s"
    assert main(["sample", "--model", "gmm:mix64", "-n", "3", "--steps", "4", "--out", str(out)]) == 0
    table = rows(out / "samples.csv")
    assert {"logp_nats", "bits_per_dim", "nfe_forward", "nfe_jvp", "nfe_vjp"} <= set(table[0])
    total = sum(int(table[0][k]) for k in ("nfe_forward", "nfe_jvp", "nfe_vjp"))
    summary = json.loads((out / "samples.json").read_text())
    assert total == sum(summary["nfe_per_sample"].values()) > 0
    assert summary["rows"] == 3 and summary["settings"]["model"] == "gmm:mix64"
    assert summary["mean_logp_nats"] == pytest.approx(sum(float(r["logp_nats"]) for r in table) / 3, rel=1e-5)


def test_adaptive_solver_warns_that_steps_is_ignored(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--model", "gmm:mix64", "-n", "2", "--steps", "2", "--solver", "dopri5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: --steps 2" in err and "dopri5" in err


def test_detail_on_one_image_prints_no_nan(tmp_path, capsys):
    from PIL import Image

    from diffdensity.zoo import gmm_preset

    gmm = gmm_preset("image16")
    img = to_uint8(gmm.sample(1, generator=torch.Generator().manual_seed(0)))[0]
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "one.png")
    assert main(["detail", "--model", "gmm:image16", "--images", str(tmp_path / "one.png"), "--steps", "4", "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "nan" not in text.lower() and "at least 3 images" in text


def test_progress_prints_one_line_per_phase_off_a_terminal():
    import io

    from diffdensity.cli.progress import Progress
    from diffdensity.solvers import StepInfo

    buf = io.StringIO()
    p = Progress(4, "phase A", stream=buf, tty=False)
    for k in range(5):
        p(StepInfo(k, 1.0 - k / 4, None, None))
    p.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phase A: 4/4 steps")


def test_check_reencodes_samples_and_reports_the_gap(tmp_path, capsys):
    import json

    out = tmp_path / "s"
    assert main(["sample", "--model", "gmm:mix64", "-n", "3", "--steps", "16", "--check", "2", "--out", str(out)]) == 0
    table = rows(out / "samples.csv")
    assert table[0]["gap_nats"] and table[1]["gap_nats"] and table[2]["gap_nats"] == ""
    gap = float(table[0]["logp_nats"]) - float(table[0]["reencoded_logp_nats"])
    assert float(table[0]["gap_nats"]) == pytest.approx(gap, abs=1e-5)
    assert json.loads((out / "samples.json").read_text())["consistency"]["samples"] == 2
    assert "re-encoded" in capsys.readouterr().out
    assert main(["sample", "--model", "gmm:mix64", "-n", "3", "--check", "2", "--no-track", "--out", str(out)]) == 2


def test_help_and_version_import_no_torch_from_the_cli():
    """The cli package defers every heavy import (measured without the package __init__, which imports the library)."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "src" / "diffdensity"
    code = (f"import sys, types; m = types.ModuleType('diffdensity'); m.__path__ = [{str(src)!r}]; sys.modules['diffdensity'] = m\n"
            "from diffdensity.cli import main\n"
            "for argv in (['--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'numpy', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_logp_out_is_checked_before_any_work(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(folder / "a.png")
    before = (folder / "a.png").read_bytes()
    for out, words in [(folder / "a.png", ["--out", ".csv"]), (tmp_path, ["--out", "folder", "logp.csv"])]:
        assert main(["logp", str(folder), "--model", "gmm:image16", "--steps", "2", "--out", str(out), "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert (folder / "a.png").read_bytes() == before
    deep = tmp_path / "new" / "sub" / "scores.csv"  # missing folders are created
    assert main(["logp", str(folder), "--model", "gmm:image16", "--steps", "2", "--out", str(deep), "--quiet"]) == 0 and deep.exists()


def test_detail_warns_about_ignored_flags(tmp_path, capsys):
    assert main(["detail", "--model", "gmm:image16", "-n", "5", "--steps", "2", "--resize", "box", "--out", str(tmp_path / "d")]) == 0
    assert "--resize, --fit and --alpha apply to --images only" in capsys.readouterr().err


def test_every_sampling_command_spells_shared_options_alike():
    from diffdensity.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("demo", "sample", "align", "detail", "logp"):
        opts = {s: a for a in sub[name]._actions for s in a.option_strings}
        assert opts["--device"].default == "auto" and opts["--seed"].default == 0 and "--model" in opts, name
        assert sub[name].description, name
        if name != "logp":
            assert "-n" in opts and "--n" in opts and "--steps" in opts, name


def test_sample_notes_tracking_that_a_learned_network_can_bias(tmp_path, capsys):
    for method, noted in (("sde", True), ("pf-ode", False)):
        assert main(["sample", "--model", "builtin:patches16", "-n", "1", "--steps", "2", "--method", method, "--out", str(tmp_path / method)]) == 0
        assert ("--check N re-encodes" in capsys.readouterr().out) is noted, method


def test_sample_sde_noise_until_switches_to_the_pf_ode(tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--model", "gmm:mix64", "-n", "2", "--steps", "8", "--method", "sde", "--noise-until", "2", "--out", str(out)]) == 0
    assert json.loads((out / "samples.json").read_text())["settings"]["noise_until"] == 2.0
    assert main(["sample", "--model", "gmm:mix64", "-n", "2", "--method", "pf-ode", "--noise-until", "2", "--out", str(tmp_path / "u")]) == 2


def test_sample_probe_basis(tmp_path, capsys):
    """Image samples take DCT probes by default; --probe-basis pixel changes the estimate, not the samples."""
    runs = {}
    for basis in ("auto", "dct", "pixel"):
        out = tmp_path / basis
        assert main(["sample", "--model", "gmm:image16", "-n", "3", "--steps", "4", "--probe-basis", basis, "--out", str(out)]) == 0
        runs[basis] = rows(out / "samples.csv")
    logp = {b: torch.tensor([float(r["logp_nats"]) for r in t]) for b, t in runs.items()}
    assert torch.allclose(logp["auto"], logp["dct"], rtol=1e-6) and (logp["auto"] - logp["pixel"]).abs().min() > 1e-3
    assert json.loads((tmp_path / "pixel" / "samples.json").read_text())["settings"]["probe_basis"] == "pixel"
    assert (tmp_path / "auto" / "grid.png").read_bytes() == (tmp_path / "pixel" / "grid.png").read_bytes()
    capsys.readouterr()
    assert main(["sample", "--model", "gmm:image16", "-n", "1", "--steps", "2", "--method", "sde", "--probe-basis", "pixel", "--out", str(tmp_path / "sde")]) == 0
    assert "--probe-basis pixel is ignored by --method sde" in capsys.readouterr().err
    tail = ["--method", "sde", "--noise-until", "2", "--probes", "1", "--probe-basis", "pixel", "--out", str(tmp_path / "until")]
    assert main(["sample", "--model", "gmm:image16", "-n", "1", "--steps", "4", *tail]) == 0
    assert "ignored" not in capsys.readouterr().err  # the PF-ODE after logSNR 2 uses both
