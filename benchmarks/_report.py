"""Shared by the benchmarks: each owns one section of docs/benchmarks.md, between its markers."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    document = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in document and end in document:
        before, rest = document.split(start, 1)
        _, after = rest.split(end, 1)
        document = before + block + after
    else:
        document = document.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document)
