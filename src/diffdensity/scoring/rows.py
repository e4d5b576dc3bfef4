"""The rows of a results file: columns with units, a content hash per input, a checksum per row.

Columns (one row per input):

================  ===========================================================================
``index``         the row's place in the file (kept across runs; new inputs are appended)
``file``          the input's path as listed ("" for rows of a tensor dataset)
``sha256``        SHA-256 of the input's bytes (file) or of its ``uint8`` values (tensor row)
``logp_nats``     log-density of the dequantised input in nats (mean over the draws)
``logp_se_nats``  standard error of ``logp_nats`` from the Hutchinson noise ("" if unknown)
``bpd``           bits per dimension, ``-logp / (D ln 2) + 7`` (docs/math.md s.7)
``nfe_forward``   network passes spent on the input: plain evaluations,
``nfe_jvp``       Jacobian-vector products,
``nfe_vjp``       vector-Jacobian products
``status``        ``ok``, ``unreadable``, ``wrong_shape`` or ``non_finite`` (the solve gave NaN or Inf)
``message``       why an input failed (one line)
``check``         first 16 hex digits of SHA-256 over the settings digest and the other fields
================  ===========================================================================

A row is accepted from an earlier run only if its checksum matches the current
settings (so rows edited by hand, or copied from a run with other settings, are
rejected), its fields parse, and the numbers of an ``ok`` row are finite.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

__all__ = ["COLUMNS", "STATUSES", "settings_digest", "seal", "problem", "row_key", "escape_name"]

COLUMNS = [
    "index", "file", "sha256", "logp_nats", "logp_se_nats", "bpd", "nfe_forward", "nfe_jvp", "nfe_vjp", "status",
    "message", "check",
]  # fmt: skip
STATUSES = ("ok", "unreadable", "wrong_shape", "non_finite")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NFE = ("nfe_forward", "nfe_jvp", "nfe_vjp")


def settings_digest(settings: dict) -> str:
    """A digest of the settings that every row's checksum includes."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _checksum(row: dict, digest: str) -> str:
    text = "\x1f".join([digest, *(str(row[c]) for c in COLUMNS if c != "check")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seal(row: dict, digest: str) -> dict[str, str]:
    """``row`` (every column but ``check``) as strings, with its checksum."""
    out = {c: str(row[c]) for c in COLUMNS if c != "check"}
    out["check"] = _checksum(out, digest)
    return out


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def problem(row: dict[str, str], digest: str) -> str | None:
    """Why ``row`` cannot be kept (``None`` if it can): checksum, fields, finite numbers."""
    if row["check"] != _checksum(row, digest):
        return "checksum does not match (the row was edited, or comes from a run with other settings)"
    if not row["index"].isdigit():
        return f"index {row['index']!r} is not a non-negative integer"
    if row["status"] not in STATUSES:
        return f"unknown status {row['status']!r}"
    if row["status"] != "ok":
        return None
    if not _HEX64.fullmatch(row["sha256"]):
        return "sha256 is not 64 hex digits"
    if not all(_finite(row[c]) for c in ("logp_nats", "bpd")):
        return f"logp_nats {row['logp_nats']!r} or bpd {row['bpd']!r} is not a finite number"
    if row["logp_se_nats"] and not (_finite(row["logp_se_nats"]) and float(row["logp_se_nats"]) >= 0):
        return f"logp_se_nats {row['logp_se_nats']!r} is not a non-negative number"
    if not all(row[c].isdigit() for c in _NFE):
        return "an NFE count is not a non-negative integer"
    return None


def escape_name(name: str) -> str:
    """A path as one line of UTF-8 text: undecodable bytes as ``\\xNN``, newlines as ``\\n`` / ``\\r``."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


def row_key(file: str, index: int | str) -> str:
    """What identifies an input across runs: its path, or ``#index`` for tensor rows (no path)."""
    return file if file else f"#{index}"
