"""Reference (support-slice) features kept on disk between runs and processes.

A clinician segments many targets from one reference: the reference slices' image features are the same every
time, so a later run (another `proxyprompt segment` process, or the Slicer module after a restart) reads them
instead of encoding them again.

* Location: `$PROXYPROMPT_HOME/features` (default `~/.proxyprompt/features`), beside the model cache
  (`registry.cache_dir`); removed, with the downloaded weights, by `proxyprompt clear-cache`.
* Key: SHA-256 of the slice's content (the windowed reference slice as the model receives it, on the target's
  in-plane grid, so the key follows the reference image, its label (which slices) and the target grid) and of
  everything that changes the features: model name, weights digest, config, image size, precision, device kind,
  torch and sam2 versions (`model_identity`).
* Bounded: after each write the least recently used files are removed until the folder holds at most
  `max_bytes()` (`PROXYPROMPT_FEATURE_CACHE_MB`, default 2048 MB; 0 turns the disk cache off).
* Written atomically (`atomic.atomic_write`), read with `torch.load(weights_only=True)`; an unreadable file is a
  miss and is removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

from ..atomic import atomic_write
from ..errors import OutputWriteError
from .registry import cache_dir

log = logging.getLogger("proxyprompt")

DEFAULT_MAX_MB = 2048
SUFFIX = ".pt"


def feature_cache_dir() -> Path:
    """`$PROXYPROMPT_HOME/features` (default `~/.proxyprompt/features`). Not created here."""
    return cache_dir().parent / "features"


def max_bytes() -> int:
    text = os.environ.get("PROXYPROMPT_FEATURE_CACHE_MB", "").strip()
    try:
        megabytes = float(text) if text else DEFAULT_MAX_MB
    except ValueError:
        megabytes = DEFAULT_MAX_MB
    return max(int(megabytes * (1 << 20)), 0)


def model_identity(*parts) -> str:
    """Digest of what makes features differ (model, weights, settings, library versions)."""
    import torch

    digest = hashlib.sha256()
    for part in (*parts, "torch", torch.__version__):
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def entry_key(model_id: str, content_digest: str) -> str:
    return hashlib.sha256(f"{model_id}:{content_digest}".encode()).hexdigest()


class FeatureDiskCache:
    """Tensors per key on disk (one file per key), size-bounded, least recently used evicted first."""

    def __init__(self, folder: Optional[Path] = None, limit: Optional[int] = None) -> None:
        self.folder = Path(folder) if folder is not None else feature_cache_dir()
        self.limit = max_bytes() if limit is None else int(limit)
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str) -> Optional[Dict[str, object]]:
        """The stored tensors of `key`, or None (a miss)."""
        import torch

        if not self.enabled:
            return None
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            value = torch.load(str(path), map_location="cpu", weights_only=True)
            os.utime(path)  # least recently *used* is evicted first
        except Exception as error:  # noqa: BLE001 - any unreadable entry is a miss, never an error of the run
            log.warning("feature cache entry %s is unreadable (%s): removed", path.name, str(error).splitlines()[0])
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: Dict[str, object]) -> None:
        """Store (atomically), then trim the folder to the size bound. A failed write only logs: the cache is an
        optimisation, the run goes on."""
        import torch

        if not self.enabled:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self._path(key), lambda temporary: torch.save(value, temporary))
        except (OSError, OutputWriteError) as error:
            log.warning("feature cache: cannot write %s (%s)", self._path(key), error)
            return
        self.trim()

    def files(self) -> List[Path]:
        if not self.folder.is_dir():
            return []
        return [path for path in self.folder.iterdir()  # not the partial files of a write in progress
                if path.suffix == SUFFIX and not path.name.startswith(".") and path.is_file()]

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.files())

    def trim(self) -> None:
        entries = []
        for path in self.files():
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.limit:
                break
            path.unlink(missing_ok=True)
            total -= size


def clear_feature_cache(folder: Optional[Path] = None) -> int:
    """Remove every cached feature file; returns the bytes freed."""
    cache = FeatureDiskCache(folder, limit=1)
    freed = 0
    for path in cache.files():
        freed += path.stat().st_size
        path.unlink(missing_ok=True)
    return freed
