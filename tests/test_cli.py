"""The command line, end to end on exact mixtures (fast, offline)."""

import csv
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


def test_demo_orders_log_density_by_quantile(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "gmm:image16", "--n", "3", "--steps", "16", "--q", "0.1", "0.5", "0.9", "--out", str(out)]) == 0
    table = rows(out / "table.csv")
    by_name = {r["sampler"]: float(r["mean_logp_nats"]) for r in table}
    assert by_name["DG q=0.1"] < by_name["DG q=0.5"] < by_name["DG q=0.9"]
    assert {"PF-ODE", "reverse SDE", "high density"} <= set(by_name)
    for name in ("grid.png", "logp_path.png", "samples.csv"):
        assert (out / name).stat().st_size > 0
    assert "DG q=0.9" in capsys.readouterr().out


def test_align_reports_both_methods(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["align", "--model", "gmm:mix64", "-n", "4", "--steps", "8", "--out", str(out)]) == 0
    assert len(rows(out / "alignment.csv")) == 4
    assert "agreement: correlation" in capsys.readouterr().out


def test_detail_on_an_image_folder_skips_bad_files(tmp_path, capsys):
    from PIL import Image

    import diffdensity as dd

    gmm = dd.zoo.gmm_preset("image16")
    imgs = to_uint8(gmm.sample(6, generator=torch.Generator().manual_seed(0)))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(imgs):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "d"
    assert main(["detail", "--model", "gmm:image16", "--images", str(folder), "--steps", "8", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "Spearman" in captured.out
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
