"""Shared by the benchmarks: each owns one section of docs/benchmarks.md, between its markers."""

from __future__ import annotations

import os
from pathlib import Path


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if absent).

    `text` may carry the markers itself. The file is replaced atomically."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = text.replace(start, "").replace(end, "").strip()
    block = f"{start}\n{body}\n{end}"
    path = Path(path)
    document = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in document and end in document:
        before, rest = document.split(start, 1)
        _, after = rest.split(end, 1)
        document = before + block + after
    else:
        document = document.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(document)
    os.replace(temporary, path)
