"""Resuming dataset scoring: which earlier rows are kept, which inputs remain to be scored."""

from __future__ import annotations

from .inputs import Source
from .shards import ShardedCSV

__all__ = ["FORMAT", "plan"]

FORMAT = "diffdensity-logp-v1"


def plan(store: ShardedCSV, source: Source, settings: dict, overwrite: bool, fingerprints: list | None):
    """Rank 0: check earlier results, collect the finished rows, list the missing indices."""
    try:
        if fingerprints is not None and len(set(fingerprints)) > 1:
            raise ValueError("the ranks were given different data tensors; every rank must pass the same dataset")
        meta = store.read_meta()
        if overwrite:
            store.remove()
        elif store.exists():
            if meta is None:
                raise ValueError(
                    f"{store.out} (or {store.parts_dir.name}/) exists but {store.meta_path.name} is missing, so it "
                    "cannot be resumed safely; pass overwrite=True (--overwrite) or choose another output"
                )
            if meta.get("settings") != settings:
                old, new = meta.get("settings", {}), settings
                diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
                raise ValueError(
                    f"{store.out} was computed with other settings {diff} (old, new); "
                    "pass overwrite=True (--overwrite) or choose another output"
                )
        rows, skipped = store.read_rows() if not overwrite else ([], 0)
        done: dict[int, dict[str, str]] = {}
        for row in rows:
            i = int(row["index"])
            if row["status"] == "ok" and 0 <= i < len(source) and row["file"] == source.names[i]:
                done.setdefault(i, row)
        store.write_meta(dict(format=FORMAT, settings=settings, n_inputs=len(source), state="running"))
        todo = [i for i in range(len(source)) if i not in done]
        return dict(done=done, todo=todo, skipped=skipped)
    except Exception as e:  # tell the other ranks instead of leaving them waiting
        return dict(error=str(e), value_error=isinstance(e, ValueError), exc=e)

