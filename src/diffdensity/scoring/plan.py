"""Resuming dataset scoring: what is checked before any work, which rows are kept, what remains.

Rules (rank 0, holding the output's lock):

* the output may not be a folder, an input, or a file with an image suffix, and its
  folder must be writable;
* earlier results are resumed only with the same settings (else ``ValueError`` naming
  the differences; ``overwrite=True`` discards them); without a readable
  ``out.meta.json``, only if some rows carry checksums of these settings;
* a row is kept only if it passes :func:`~diffdensity.scoring.rows.problem` (checksum,
  fields, finite numbers); every other line is reported with its file and line;
* an input is recomputed unless its row is ``ok`` and records the SHA-256 of the input's
  current content: a file replaced by other bytes under the same name is scored again;
* rows of inputs that are not in this run's list are kept (the file never shrinks
  without ``overwrite``); new inputs take the free indices (gaps left by rejected lines,
  then past the end).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .inputs import IMAGE_SUFFIXES, Source
from .rows import escape_name, problem, row_key, settings_digest
from .shards import ShardedCSV

__all__ = ["FORMAT", "Plan", "plan", "check_output"]

FORMAT = "diffdensity-logp-v2"


@dataclass
class Plan:
    """``todo``: ``(position, row index)`` to score; ``done``: key -> kept row of a current input;
    ``kept``: rows of inputs not in this run; ``problems``: lines that were not accepted."""

    todo: list[tuple[int, int]]
    done: dict[str, dict[str, str]] = field(default_factory=dict)
    kept: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    changed: int = 0


def check_output(out: Path, source: Source) -> None:
    """Refuse an output that would overwrite an input or cannot be written, before any work."""
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; give a CSV file path, e.g. {out / 'logp.csv'}")
    if out.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"output {out} has an image suffix ({out.suffix}); give a .csv path so that no image is replaced")
    targets = {os.path.realpath(out.with_name(out.name + s)) for s in ("", ".meta.json", ".parts", ".lock")}
    for name in source.names:
        if name and os.path.realpath(name) in targets:
            raise ValueError(f"output {out} is also an input ({name}); choose an output outside the inputs")
    folder = out.parent if str(out.parent) else Path(".")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the output {out}: folder {existing} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"cannot write the output {out}: the file is read-only")


def _check_settings(store: ShardedCSV, settings: dict, digest: str) -> None:
    """Refuse earlier results computed otherwise. Without a readable ``meta.json``, rows sealed
    with these very settings (their checksums include them) still allow resuming."""
    meta = store.read_meta()
    if meta is None:
        if store.read_rows(lambda row: problem(row, digest))[0]:
            return
        raise ValueError(
            f"{store.out} (or {store.parts_dir.name}/) exists but {store.meta_path.name} is missing or unreadable, so it "
            "cannot be resumed safely; pass overwrite=True (--overwrite) or choose another output"
        )
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{store.out} was written in format {meta.get('format')!r}, not {FORMAT!r}; "
            "pass overwrite=True (--overwrite) or choose another output"
        )
    old, new = meta.get("settings") or {}, settings
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        raise ValueError(
            f"{store.out} was computed with other settings {diff} (old, new); "
            "pass overwrite=True (--overwrite) or choose another output"
        )


def _free_indices(used: set[int]):
    """The indices not in ``used``, in increasing order: first the gaps, then past the end."""
    i = 0
    while True:
        if i not in used:
            yield i
        i += 1


def plan(store: ShardedCSV, source: Source, settings: dict, overwrite: bool) -> Plan:
    """Rank 0: check the output and earlier results; the rows to keep and the inputs to score."""
    check_output(store.out, source)
    if overwrite:
        store.remove()
    digest = settings_digest(settings)
    if not overwrite and store.exists():
        _check_settings(store, settings, digest)
    rows, problems = store.read_rows(lambda row: problem(row, digest))
    by_key: dict[str, dict[str, str]] = {}
    for row in rows:  # part files come after the output: the newer row of an input wins
        by_key[row_key(row["file"], row["index"])] = row
    result = Plan(todo=[], problems=problems)
    free = _free_indices({int(r["index"]) for r in by_key.values()})
    current = set()
    for i, name in enumerate(source.names):
        key = row_key(escape_name(name), i)
        current.add(key)
        row = by_key.get(key)
        if row is not None and row["status"] == "ok" and row["sha256"] == source.content_hash(i):
            result.done[key] = row
            continue
        if row is not None:
            result.changed += row["status"] == "ok"
            index = int(row["index"])
        elif name:
            index = next(free)
        else:
            index = i
        result.todo.append((i, index))
    result.kept = [r for k, r in by_key.items() if k not in current]
    store.write_meta(dict(format=FORMAT, settings=settings, n_inputs=len(source), state="running"))
    return result
