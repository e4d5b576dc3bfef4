"""docs/own-images.md, run as written: its Python blocks and its diffdensity commands, in order,
in a fresh folder, on the tiny random diffusers pipeline the page builds."""

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from diffdensity.cli import main  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "own-images.md"


def blocks(text):
    """``(language, code)`` of every fenced block tagged python or bash, in order."""
    return re.findall(r"```(python|bash)\n(.*?)```", text, flags=re.S)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_own_images_tutorial_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    found = blocks(PAGE.read_text())
    assert [lang for lang, _ in found].count("bash") >= 2 and [lang for lang, _ in found].count("python") >= 3
    for lang, code in found:
        if lang == "python":
            exec(compile(code, str(PAGE), "exec"), {"__name__": "tutorial"})
            continue
        for line in code.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                assert argv[0] == "diffdensity", line
                assert main(argv[1:]) == 0, line
    out = capsys.readouterr().out
    detail = (tmp_path / "out/mine/detail.csv").read_text()
    assert "resized 32x32 -> 16x16 (lanczos)" in detail and "greyscale replicated to RGB" in detail
    assert (tmp_path / "out/samples/samples.json").exists() and (tmp_path / "out/prepared.csv").exists()
    # logp with --resize scores the same images as the prepared copies, and records the preprocessing
    direct = {Path(r.split(",")[1]).name: r.split(",")[3] for r in (tmp_path / "out/mine.csv").read_text().splitlines()[1:]}
    prepared = {Path(r.split(",")[1]).name: r.split(",")[3] for r in (tmp_path / "out/prepared.csv").read_text().splitlines()[1:]}
    assert direct and direct.keys() == prepared.keys()
    assert all(abs(float(direct[k]) - float(prepared[k])) < 1e-6 * abs(float(prepared[k])) for k in direct)  # same pixels, same noise
    assert '"preprocess"' in (tmp_path / "out/mine.csv.meta.json").read_text()
    assert "tensor([" in out  # the API block printed its bits/dim
