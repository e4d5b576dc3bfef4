"""The demo's index.html, rendered by headless Chromium: the page shows its figures and table."""

import shutil
import subprocess

import pytest

from diffdensity.cli import main

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def screenshot(page, png, size=(1000, 1600)):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
           f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", page.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    from PIL import Image

    return __import__("numpy").asarray(Image.open(png).convert("RGB")).astype(float)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
def test_demo_page_renders_grid_plot_and_table(tmp_path, monkeypatch):
    from diffdensity.cli import demo

    monkeypatch.setattr(demo, "REENCODING", {"steps": 8})  # the page, not the re-encoding's accuracy
    out = tmp_path / "demo"
    assert main(["demo", "--model", "gmm:image16", "-n", "2", "--steps", "2", "--q", "0.5", "--out", str(out)]) == 0
    page = out / "index.html"
    html = page.read_text()
    assert 'src="grid.png"' in html and 'src="logp_path.png"' in html and "<table>" in html and "mean_logp_nats" in html and "median_abs_gap_nats" in html
    shot = screenshot(page, tmp_path / "page.png")
    (out / "grid.png").rename(out / "moved.png")
    (out / "logp_path.png").rename(out / "moved2.png")
    bare = screenshot(page, tmp_path / "bare.png")  # the same page without its images
    assert shot.std() > 20  # not blank
    colourful = (shot.max(2) - shot.min(2)) > 60  # the sample grid and the plot's lines are coloured; text is grey
    assert colourful.mean() > 0.01 and ((bare.max(2) - bare.min(2)) > 60).mean() < colourful.mean() / 5
    assert abs(shot - bare).mean() > 5  # the figures are what the page shows
