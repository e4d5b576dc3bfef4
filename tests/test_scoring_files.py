"""Dataset scoring under damaged, changed and unusual inputs and results files: nothing lost, nothing silently wrong."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffdensity.cli import main as cli_main
from diffdensity.scoring import score_dataset
from diffdensity.scoring.rows import COLUMNS, seal, settings_digest
from diffdensity.scoring.shards import ShardedCSV

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import CALLS, OPTS, Counting, make_model, read_csv, write_images  # noqa: E402

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def model():
    return make_model()


def by_file(rows):
    return {Path(r["file"]).name: r for r in rows}


def rewrite(path: Path, edit) -> None:
    """Apply ``edit(rows)`` to the CSV at ``path`` (rows as dicts) and write it back."""
    rows = read_csv(path)
    edit(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


# -- files ---------------------------------------------------------------------------------


def test_results_never_shrink_with_another_input_list(model, tmp_path):
    write_images(tmp_path / "good12", 12)
    small = tmp_path / "good8"
    small.mkdir()
    for p in sorted((tmp_path / "good12").iterdir())[:8]:
        shutil.copy(p, small / p.name)
    out = tmp_path / "A.csv"
    first = score_dataset(model, tmp_path / "good12", out, **OPTS)
    before = by_file(read_csv(out))
    counting = Counting(model)
    res = score_dataset(counting, small, out, **OPTS)  # other paths: 8 new rows, the 12 earlier ones kept
    rows = read_csv(out)
    assert len(rows) == 20 and res.n_rows == 20 and len(res.rows) == 8 and res.computed == 8
    assert [int(r["index"]) for r in rows] == list(range(20))
    for name, row in before.items():  # the old rows are untouched, at their old index
        assert next(r for r in rows if r["file"] == row["file"]) == row
    # the same images under other paths get the same numbers (noise keyed by content)
    assert [r["logp_nats"] for r in res.rows] == [r["logp_nats"] for r in first.rows[:8]]
    again = Counting(model)
    res = score_dataset(again, list(sorted((tmp_path / "good12").iterdir()))[3:5], out, **OPTS)  # a subset: all resumed
    assert again.rows == 0 and res.resumed == 2 and len(read_csv(out)) == 20


def test_output_may_not_be_an_input(model, tmp_path):
    write_images(tmp_path / "imgs", 4)
    target = tmp_path / "imgs" / "img_003.png"
    data = target.read_bytes()
    for out in (target, tmp_path / "imgs" / "new.png", tmp_path / "imgs"):
        with pytest.raises(ValueError, match="input|image suffix|folder"):
            score_dataset(model, tmp_path / "imgs", out, overwrite=True, **OPTS)
    assert target.read_bytes() == data and not (tmp_path / "imgs" / "new.png").exists()
    with pytest.raises(ValueError, match="also an input"):  # the input named explicitly, without an image suffix
        (tmp_path / "x.csv").write_bytes(data)
        score_dataset(model, [tmp_path / "x.csv"], tmp_path / "x.csv", **OPTS)
    assert (tmp_path / "x.csv").read_bytes() == data
    assert cli_main(["logp", str(tmp_path / "imgs"), "--model", "gmm:image16", "--out", str(target), "--overwrite", "--quiet"]) == 2
    assert target.read_bytes() == data


def test_empty_folder_is_an_error(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no PNG/JPEG"):
        score_dataset(model, tmp_path / "empty", tmp_path / "e.csv", **OPTS)
    assert not (tmp_path / "e.csv").exists()
    code = cli_main(["logp", str(tmp_path / "empty"), "--model", "gmm:image16", "--out", str(tmp_path / "e.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "no PNG/JPEG" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unusual_file_names_round_trip(model, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["comma,name.png", 'quote"s.png', "new\nline.png", "ünïcode ✓.png", " spaced .png", "semi;colon.PNG"]
    rng = np.random.default_rng(3)
    for n in names:
        PIL.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / n, format="PNG")
    out = tmp_path / "odd.csv"
    res = score_dataset(model, folder, out, **OPTS)
    assert res.n_ok == len(names) and len(read_csv(out)) == len(names)
    assert sum("\\n" in r["file"] for r in read_csv(out)) == 1  # the newline is escaped: one line per row
    again = Counting(model)
    res = score_dataset(again, folder, out, **OPTS)
    assert again.rows == 0 and res.resumed == len(names) and res.problems == []


# -- resume ----------------------------------------------------------------------------------


def test_replaced_file_is_scored_again(model, tmp_path):
    paths = write_images(tmp_path / "imgs", 4)
    out = tmp_path / "r.csv"
    old = by_file(score_dataset(model, tmp_path / "imgs", out, **OPTS).rows)
    write_images(tmp_path / "other", 1, seed=9)
    shutil.copy(tmp_path / "other" / "img_000.png", paths[2])  # same name, other bytes
    counting = Counting(model)
    res = score_dataset(counting, tmp_path / "imgs", out, **OPTS)
    assert res.changed == 1 and res.computed == 1 and counting.rows == CALLS
    new = by_file(read_csv(out))
    assert new["img_002.png"]["sha256"] != old["img_002.png"]["sha256"]
    assert new["img_002.png"]["logp_nats"] != old["img_002.png"]["logp_nats"]
    assert new["img_002.png"]["index"] == old["img_002.png"]["index"] and len(new) == 4
    fresh = score_dataset(model, [paths[2]], tmp_path / "fresh.csv", **OPTS)
    assert fresh.rows[0]["logp_nats"] == new["img_002.png"]["logp_nats"]


def _damage_cases(digest):
    def typed(rows):  # a well-formed row typed in: a plausible number without a valid checksum
        rows[1]["logp_nats"] = "-1.5"

    def sealed_nan(rows):  # even with a matching checksum, nan in an ok row is refused
        rows[2].update(seal({**rows[2], "logp_nats": "nan", "bpd": "nan"}, digest))

    def text(rows):
        rows[3]["bpd"] = "many"

    def foreign(rows):  # a row sealed under other settings
        rows[0].update(seal({**rows[0], "logp_nats": "-2.0"}, settings_digest({"steps": 99})))

    def huge(rows):
        rows[1].update(seal({**rows[1], "logp_nats": "1e999", "bpd": "-1e999"}, digest))

    return [(typed, 1, "checksum"), (sealed_nan, 2, "not a finite"), (text, 3, "checksum"), (foreign, 0, "checksum"),
            (huge, 1, "not a finite")]  # fmt: skip


@pytest.mark.parametrize("case", range(5))
def test_damaged_rows_are_reported_with_file_and_line_and_recomputed(model, tmp_path, case):
    write_images(tmp_path / "imgs", 4)
    out = tmp_path / "d.csv"
    ref = score_dataset(model, tmp_path / "imgs", out, **OPTS)
    digest = settings_digest(ref.settings)
    edit, row, why = _damage_cases(digest)[case]
    rewrite(out, edit)
    counting = Counting(model)
    res = score_dataset(counting, tmp_path / "imgs", out, **OPTS)
    assert counting.rows == CALLS and res.computed == 1 and res.resumed == 3
    assert len(res.problems) == 1 and f"{out} line {row + 2}" in res.problems[0] and why in res.problems[0]
    assert [r["logp_nats"] for r in read_csv(out)] == [r["logp_nats"] for r in ref.rows]
    assert all(math.isfinite(float(r["logp_nats"])) for r in read_csv(out))


def test_garbage_lines_do_not_stop_a_rerun(model, tmp_path, capsys):
    write_images(tmp_path / "imgs", 3)
    out = tmp_path / "g.csv"
    ref = score_dataset(model, tmp_path / "imgs", out, **OPTS)
    with open(out, "ab") as f:
        f.write(b"\xff\xfe binary\n" + b"1,2,3\n" + ",".join(["x"] * len(COLUMNS)).encode() + b"\n")
    res = score_dataset(model, tmp_path / "imgs", out, **{**OPTS, "verbose": True})
    assert res.resumed == 3 and len(res.problems) == 3 and [p.split(": ")[0] for p in res.problems] == [
        f"{out} line {n}" for n in (5, 6, 7)
    ]
    assert "line 6" in capsys.readouterr().err
    assert [r["logp_nats"] for r in read_csv(out)] == [r["logp_nats"] for r in ref.rows]


def test_concurrent_run_is_refused_and_loses_nothing(model, tmp_path):
    write_images(tmp_path / "imgs", 3)
    out = tmp_path / "c.csv"
    store = ShardedCSV(out, COLUMNS)
    with store.lock():
        with pytest.raises(RuntimeError, match="another run"):
            score_dataset(model, tmp_path / "imgs", out, **OPTS)
    res = score_dataset(model, tmp_path / "imgs", out, **OPTS)
    assert res.n_ok == 3 and not (tmp_path / "c.csv.lock").exists()


def test_older_format_is_refused(model, tmp_path):
    write_images(tmp_path / "imgs", 2)
    out = tmp_path / "old.csv"
    out.write_text("index,file,logp,bpd,nfe,status,message\n0,a.png,-1,8,4,ok,\n")
    (tmp_path / "old.csv.meta.json").write_text(json.dumps({"format": "diffdensity-logp-v1", "settings": {}}))
    with pytest.raises(ValueError, match="format"):
        score_dataset(model, tmp_path / "imgs", out, **OPTS)
    assert out.read_text().startswith("index,file,logp,")


# -- numbers ---------------------------------------------------------------------------------


def test_standard_error_column_and_summary(model, tmp_path):
    write_images(tmp_path / "imgs", 3)
    res = score_dataset(model, tmp_path / "imgs", tmp_path / "s.csv", probes=4, **OPTS)
    se = res.stderr
    assert se.shape == (3,) and bool((se > 0).all()) and bool(torch.isfinite(se).all())
    assert bool((se < res.logp.abs()).all())
    s = res.summary()
    assert s["n_ok"] == 3 and math.isclose(s["mean_bpd"], float(res.bpd.mean()), rel_tol=1e-12)
    assert math.isclose(s["mean_bpd_stderr"], float(res.bpd.std() / math.sqrt(3)), rel_tol=1e-12)
    assert s["nfe"]["forward"] + s["nfe"]["jvp"] + s["nfe"]["vjp"] == 3 * CALLS * 4
    json.dumps(s)  # JSON-ready
    one = score_dataset(model, tmp_path / "imgs", tmp_path / "s1.csv", probes=1, **OPTS)
    # one probe per call: the previous call's probe is the independent second one (the first call takes two)
    assert [float(r["logp_se_nats"]) for r in read_csv(tmp_path / "s1.csv")] == one.stderr.tolist()
    assert bool((one.stderr > 0).all()) and one.summary()["nfe"]["jvp"] + one.summary()["nfe"]["vjp"] == 3 * (CALLS + 1)


def test_tensor_rows_and_files_share_numbers_and_hashes_per_row(model, tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    data = torch.stack([torch.from_numpy(np.array(PIL.open(p))).permute(2, 0, 1) for p in paths])
    a = score_dataset(model, data, tmp_path / "t.csv", **OPTS)
    b = score_dataset(model, data[[2, 0]], tmp_path / "t2.csv", **OPTS)  # other order, other length
    assert [r["logp_nats"] for r in b.rows] == [a.rows[2]["logp_nats"], a.rows[0]["logp_nats"]]
    assert len({r["sha256"] for r in a.rows}) == 3


class _NaNForBright:
    """The mixture's score, but NaN for samples whose mean value exceeds 0.5 (a network failing on some inputs)."""

    def __init__(self, model):
        self.model, self.schedule, self.event_shape = model, model.schedule, model.event_shape

    def __repr__(self) -> str:
        return "NaNForBright(" + repr(self.model) + ")"

    def score(self, x, t, **cond):
        s = self.model.score(x, t, **cond)
        bright = x.reshape(x.shape[0], -1).mean(1) > 0.5
        return torch.where(bright.reshape(-1, *[1] * (x.ndim - 1)), torch.full_like(s, math.nan), s)


def test_inputs_giving_non_finite_values_fail_alone(model, tmp_path):
    gen = torch.Generator().manual_seed(5)
    data = torch.randint(0, 256, (4, *model.event_shape), generator=gen, dtype=torch.uint8)
    data[2] = 255  # x close to +1 everywhere: the network fails on it
    ref = score_dataset(model, data, tmp_path / "ref.csv", **OPTS)
    res = score_dataset(_NaNForBright(model), data, tmp_path / "nan.csv", batch_size=4, **OPTS)
    status = [r["status"] for r in res.rows]
    assert status == ["ok", "ok", "non_finite", "ok"] and res.exit_code == 1
    assert "NaN or Inf" in res.rows[2]["message"] and res.rows[2]["logp_nats"] == ""
    for i in (0, 1, 3):  # the others keep their numbers
        assert res.rows[i]["logp_nats"] == ref.rows[i]["logp_nats"]
    again = score_dataset(_NaNForBright(model), data, tmp_path / "nan.csv", **OPTS)  # the failed row is retried, nothing else
    assert again.resumed == 3 and again.n_failed == 1 and again.problems == []


def test_numpy_integers_are_accepted(model, tmp_path):
    write_images(tmp_path / "imgs", 2)
    opts = dict(OPTS, steps=np.int64(OPTS["steps"]))
    res = score_dataset(model, tmp_path / "imgs", tmp_path / "np.csv", seed=np.int64(0), batch_size=np.int32(1), probes=np.int8(1), **opts)
    ref = score_dataset(model, tmp_path / "imgs", tmp_path / "py.csv", probes=1, **OPTS)
    assert res.settings["steps"] == 4 and type(res.settings["seed"]) is int
    assert [r["logp_nats"] for r in res.rows] == [r["logp_nats"] for r in ref.rows]


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_lost_settings_file_still_resumes_rows_sealed_with_these_settings(model, tmp_path, damage):
    write_images(tmp_path / "imgs", 3)
    out = tmp_path / "m.csv"
    ref = score_dataset(model, tmp_path / "imgs", out, **OPTS)
    meta = tmp_path / "m.csv.meta.json"
    meta.unlink() if damage == "delete" else meta.write_bytes(b"{\x00 not json")
    counting = Counting(model)
    res = score_dataset(counting, tmp_path / "imgs", out, **OPTS)
    assert counting.rows == 0 and res.resumed == 3 and [r["logp_nats"] for r in res.rows] == [r["logp_nats"] for r in ref.rows]
    meta.unlink()
    with pytest.raises(ValueError, match="meta.json"):  # rows sealed under other settings do not count
        score_dataset(model, tmp_path / "imgs", out, **{**OPTS, "steps": 5})
