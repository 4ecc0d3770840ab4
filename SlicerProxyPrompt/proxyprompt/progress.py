"""One progress event type for every stage, and one cancel helper.

Every long stage reports `ProgressEvent(phase, done, total, message)`: the CLI draws it as a tqdm bar, the engine
worker (`proxyprompt serve`) sends it as one JSON line, the Slicer module shows it in its progress bar.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from .errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    phase: str  # "read", "register", "align", "encode", "propagate", "write", ...
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "ProgressEvent":
        return cls(str(data["phase"]), int(data["done"]), int(data["total"]), str(data.get("message", "")))


ProgressCallback = Callable[[ProgressEvent], None]


def report(progress: Optional[ProgressCallback], phase: str, done: int, total: int, message: str = "") -> None:
    """Send one event when someone listens (every stage calls this instead of the callback directly)."""
    if progress is not None:
        progress(ProgressEvent(phase, int(done), int(total), message))


def check_cancel(cancel) -> None:
    """Raise `Cancelled` when the token (anything with `is_set()`) is set; the one cancel check of the engine."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by the user")


class TqdmProgress:
    """A progress callback that draws one tqdm bar per phase on stderr (the CLI's view of the events)."""

    UNITS = {"register": "%", "align": "step", "read": "file", "write": "file", "train": "step"}

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bars = {}

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        import sys

        from tqdm import tqdm

        bar = self._bars.get(event.phase)
        if bar is None:
            unit = self.UNITS.get(event.phase, "slice")
            bar = self._bars[event.phase] = tqdm(total=event.total, desc=event.phase, unit=unit, file=sys.stderr,
                                                 leave=False)
        bar.total = event.total
        bar.n = event.done
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
