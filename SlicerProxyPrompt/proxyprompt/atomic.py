"""Writing an output so that a reader sees either nothing or the whole, verified file (docs/reliability.md).

The file is written to ``.partial-<pid>-<random><suffix>`` in the destination folder, flushed to disk
(fsync), checked by the caller's `verify` (re-read its header and data) and only then renamed onto the
destination. A failed write, a failed check or a cancel leaves nothing; a killed process leaves its partial
file, which the next write into that folder removes (its writer is gone or it is old). Outputs get the
permissions the umask gives a new file, not mkstemp's 0600. An output that resolves to an input file
(symlink, relative path, hard link) is refused before any work.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from .errors import InputError, OutputWriteError

PARTIAL_PREFIX = ".partial-"
# ".partial-<pid>-<mkstemp random>": the pid says whether the writer still runs; older files lack it.
_PARTIAL_NAME = re.compile(r"^\.partial-(?:(\d+)-)?[A-Za-z0-9_]{6,}")
# A partial file this old is left over whatever its pid says (pids are reused); writes take seconds.
STALE_PARTIAL_SECONDS = 15 * 60

_umask_lock = threading.Lock()


def current_umask() -> int:
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_stale_partials(folder, now: Optional[float] = None) -> list:
    """Remove our partial files left in `folder` by killed runs; return the paths removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        found = _PARTIAL_NAME.match(entry.name)
        if not found or not entry.is_file(follow_symlinks=False):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = int(found.group(1)) if found.group(1) else None
        writer_gone = pid is not None and pid != os.getpid() and not _pid_alive(pid)
        if writer_gone or age > STALE_PARTIAL_SECONDS:
            try:
                os.remove(entry.path)
                removed.append(entry.path)
            except OSError:
                pass
    return removed


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        first, second = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def refuse_overwriting_inputs(output, inputs: Iterable) -> None:
    """InputError when `output` is one of the `inputs`: the same path once resolved (relative paths, symlinks)
    or the same file (device and inode: hard links)."""
    output = Path(output)
    for item in inputs:
        if item is None:
            continue
        item = Path(item)
        if _same_file(output, item):
            raise InputError(f"output {output} is the input file {item}: refusing to overwrite an input")


def check_output_folder(path) -> None:
    """InputError unless `path` can be created in its folder: the folder exists, is a folder, is writable, and
    the name fits the file system."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise InputError(f"output folder does not exist: {folder}")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} is a file, not a folder")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(path.name)) > name_max:
        raise InputError(f"output file name is too long ({len(os.fsencode(path.name))} bytes; at most {name_max})")
    if path.is_dir():
        raise InputError(f"output {path} is a folder")
    if not os.access(folder, os.W_OK):
        reason = "is on a read-only file system" if _read_only_mount(folder) else "is not writable"
        raise InputError(f"output folder {folder} {reason}")


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _free_bytes(folder) -> int:
    try:
        status = os.statvfs(folder)
        return status.f_bavail * status.f_frsize
    except (OSError, AttributeError):
        return -1


def _write_reason(error: OSError) -> str:
    known = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EIO: "I/O error",
             errno.EFBIG: "file too large for the file system"}
    return known.get(error.errno, error.strerror or str(error))


def _full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".seg.nrrd", ".nii.gz"):
        if name.endswith(suffix):
            return suffix
    return path.suffix


def atomic_write(path, write_function: Callable[[str], None], verify: Optional[Callable[[str], None]] = None) -> Path:
    """Call ``write_function(temporary_path)``, fsync it, ``verify(temporary_path)`` (raises on a bad file), then
    move it onto `path` in one step. Any failure removes the temporary file; `OSError`s become `OutputWriteError`."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    clean_stale_partials(folder)
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-",
                                                 suffix=_full_suffix(path), dir=folder)
    except OSError as error:
        raise OutputWriteError(f"cannot write {path}: {_write_reason(error)}") from None
    os.close(descriptor)
    try:
        write_function(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())  # a full disk or I/O error surfaces here, not after the rename
        if verify is not None:
            try:
                verify(temporary)
            except InputError as error:
                full = " (the disk is full)" if _free_bytes(folder) == 0 else ""
                raise OutputWriteError(f"writing {path} failed{full}: the written file does not read back ({error}); "
                                       "nothing was written") from None
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except OSError as error:
        raise OutputWriteError(f"cannot write {path}: {_write_reason(error)}; nothing was written") from None
    except RuntimeError as error:
        if type(error) is not RuntimeError:  # Cancelled, OutputWriteError, ...: already say what happened
            raise
        lines = str(error).strip().splitlines()  # SimpleITK reports write errors as a plain RuntimeError
        raise OutputWriteError(f"cannot write {path}: {lines[-1] if lines else 'write failed'}; "
                               "nothing was written") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    try:  # the rename itself is durable once the folder is synced
        folder_descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_descriptor)
        finally:
            os.close(folder_descriptor)
    except OSError:
        pass  # some file systems cannot fsync a folder; the file itself is on disk
    return path
