"""A self-contained HTML page beside a command's outputs: figures, a table and notes together."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

__all__ = ["write_page"]

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1100px; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
p.note { font-size: 0.9em; color: #444; }
"""


def write_page(
    path: Path,
    title: str,
    figures: Sequence[tuple[str, str]],
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    notes: Sequence[str] = (),
) -> Path:
    """Write ``path`` (``index.html``): ``figures`` as ``(file name beside the page, caption)``,
    then a table (``header``, ``rows``) and paragraphs of ``notes``. Only relative links; no
    script, no network."""
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
    for name, caption in figures:
        parts.append(f'<figure><img src="{e(name)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr></thead><tbody>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    parts += [f'<p class="note">{e(n)}</p>' for n in notes]
    parts.append("</body></html>\n")
    from .._files import atomic_write

    atomic_write(path, "\n".join(parts))
    return path
