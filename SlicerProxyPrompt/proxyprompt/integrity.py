"""Is an input complete and usable? Checks made before and after the reader runs (docs/reliability.md).

ITK's readers fill a short or corrupt NIfTI / NRRD stream with zeros and report success, so before a file
is read its bytes are measured against what its header declares: the header is parsed here, a ``.gz``
stream is decompressed in chunks (never held in memory, never inflated past what the header declares) and
its CRC checked. A header that declares more voxels than the file could hold even at deflate's best ratio
is refused from the header alone. After reading, an image without contrast or with NaN / Inf intensities
is refused, and a DICOM series must have evenly spaced slices.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import InputError

# deflate cannot compress better than ~1032:1; a stream smaller than declared / this is incomplete for sure.
_MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 20


def _unreadable(path, reason: str) -> InputError:
    return InputError(f"cannot read {path}: {reason}")


def _bytes_text(count: int) -> str:
    return f"{count:,} bytes"


# --- NIfTI --------------------------------------------------------------------------------------
def _nifti_layout(header: bytes, path) -> Optional[Tuple[int, int, Optional[np.dtype]]]:
    """(data offset, data bytes, numpy dtype when the voxels are floating point) that a NIfTI-1 / NIfTI-2
    single-file header declares; None for a header/image pair (``.hdr`` + ``.img``), whose data is elsewhere."""
    if len(header) < 4:
        raise _unreadable(path, f"too short to be a NIfTI file ({len(header)} bytes)")
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", header[:4])[0]
        if size in (348, 540):
            break
    else:
        raise _unreadable(path, "not a NIfTI file (no NIfTI header)")
    if len(header) < size:
        raise _unreadable(path, f"truncated: {len(header)} bytes, less than its {size}-byte NIfTI header")
    if size == 348:
        magic = header[344:348]
        dims = struct.unpack(endian + "8h", header[40:56])
        datatype = struct.unpack(endian + "h", header[70:72])[0]
        bitpix = struct.unpack(endian + "h", header[72:74])[0]
        offset = int(struct.unpack(endian + "f", header[108:112])[0])
        if magic[:3] != b"n+1":
            return None
        offset = max(offset, 352)
    else:
        magic = header[4:12]
        datatype = struct.unpack(endian + "h", header[12:14])[0]
        bitpix = struct.unpack(endian + "h", header[14:16])[0]
        dims = struct.unpack(endian + "8q", header[16:80])
        offset = int(struct.unpack(endian + "q", header[168:176])[0])
        if magic[:3] != b"n+2":
            return None
        offset = max(offset, 544)
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or any(int(d) < 1 for d in dims[1 : ndim + 1]) or bitpix < 1:
        raise _unreadable(path, f"invalid NIfTI header (dim {list(dims)}, bitpix {bitpix})")
    voxels = int(np.prod([int(d) for d in dims[1 : ndim + 1]], dtype=object))
    float_code = _NIFTI_FLOAT_TYPES.get(int(datatype))
    return offset, voxels * int(bitpix) // 8, None if float_code is None else np.dtype(endian + float_code)


# NIfTI datatype codes of real floating-point voxels (complex types are refused by the reader anyway)
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _count_non_finite(chunks, dtype: np.dtype) -> int:
    """NaN / Inf values in float voxel data given as an iterator of byte blocks."""
    bad, carry = 0, b""
    for block in chunks:
        block = carry + block
        usable = len(block) - len(block) % dtype.itemsize
        carry = block[usable:]
        bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(block[:usable], dtype=dtype))))
    return bad


def nifti_non_finite_voxels(path) -> int:
    """NaN / Inf voxels in a NIfTI file's own bytes (``.nii``, ``.nii.gz``, float32 / float64; 0 for anything else).
    ITK's NIfTI reader turns NaN into 0, so an image read from NIfTI cannot show them."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")) or not path.is_file():
        return 0
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        layout = _nifti_layout(stream.read(544), path)
    if layout is None or layout[2] is None:
        return 0
    with opener(path, "rb") as stream:
        return _count_non_finite(_blocks(stream, layout[0], layout[1]), layout[2])


def _blocks(stream, skip: int, length: int):
    """Byte blocks [skip, skip + length) of a readable stream."""
    position, end = 0, skip + length
    while position < end:
        got = stream.read(min(_CHUNK, end - position))
        if not got:
            return
        start = max(skip - position, 0)
        position += len(got)
        if start < len(got):
            yield got[start:]


# --- NRRD ---------------------------------------------------------------------------------------
_NRRD_TYPE_BYTES = {
    **dict.fromkeys(["signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"], 1),
    **dict.fromkeys(["short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"], 2),
    **dict.fromkeys(["int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"], 4),
    **dict.fromkeys(["longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"], 8),
}
_NRRD_HEADER_LIMIT = 1 << 20


def _nrrd_layout(path: Path) -> Optional[Tuple[int, int, str]]:
    """(data offset, data bytes, encoding) of a NRRD file with attached raw or gzip data; None when its data
    is elsewhere or in an encoding not checked here (ascii, bzip2, skips)."""
    with open(path, "rb") as handle:
        head = handle.read(_NRRD_HEADER_LIMIT)
    if not head.startswith(b"NRRD"):
        raise _unreadable(path, "not a NRRD file (no NRRD magic)")
    end = head.find(b"\n\n")
    if end < 0:
        raise _unreadable(path, "truncated: its NRRD header does not end")
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields[key.strip().lower()] = value.strip()
    if any(k in fields for k in ("data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip")):
        return None
    type_bytes = _NRRD_TYPE_BYTES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "raw").lower()
    encoding = {"gz": "gzip"}.get(encoding, encoding)
    if type_bytes is None or encoding not in ("raw", "gzip") or "sizes" not in fields:
        return None
    try:
        sizes = [int(s) for s in fields["sizes"].split()]
    except ValueError:
        raise _unreadable(path, f"invalid NRRD header (sizes: {fields['sizes']})") from None
    if not sizes or any(s < 1 for s in sizes):
        raise _unreadable(path, f"invalid NRRD header (sizes: {fields['sizes']})")
    return end + 2, int(np.prod(sizes, dtype=object)) * type_bytes, encoding


# --- streams ------------------------------------------------------------------------------------
def _gzip_length(path: Path, offset: int, limit: int) -> int:
    """Decompressed length of the gzip stream at `offset` (reading stops past `limit`); corrupt streams raise."""
    total = 0
    with open(path, "rb") as raw:
        raw.seek(offset)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                while total <= limit:
                    block = stream.read(_CHUNK)
                    if not block:
                        break
                    total += len(block)
        except EOFError:
            raise _unreadable(path, f"truncated: its compressed stream ends early ({_bytes_text(total)} "
                                     "decompressed)") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as error:
            raise _unreadable(path, f"corrupt: its compressed stream fails to decompress ({error})") from None
    return total


def _refuse_short(path, have: int, need: int, what: str) -> None:
    if have < need:
        raise _unreadable(path, f"truncated or corrupt: {what} {_bytes_text(have)}, its header declares "
                                f"{_bytes_text(need)}")


def check_file_complete(path) -> None:
    """Refuse a NIfTI (``.nii``, ``.nii.gz``) or NRRD (``.nrrd``, ``.seg.nrrd``, attached data) file whose data
    is shorter than its header declares or whose gzip stream is corrupt. Other formats pass unchecked."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        compressed = path.stat().st_size
        try:
            with gzip.open(path, "rb") as stream:
                header = stream.read(544)
        except EOFError:
            raise _unreadable(path, "truncated: its compressed stream ends inside the header") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as error:
            raise _unreadable(path, f"not a gzip-compressed NIfTI file ({error})") from None
        layout = _nifti_layout(header, path)
        if layout is None:
            return
        need = layout[0] + layout[1]
        if compressed * _MAX_DEFLATE_RATIO < need:
            raise _unreadable(path, f"its header declares {_bytes_text(need)} of data, more than its "
                                    f"{_bytes_text(compressed)} can hold (truncated, or a corrupt header)")
        _refuse_short(path, _gzip_length(path, 0, need), need, "its decompressed stream holds")
    elif name.endswith(".nii"):
        with open(path, "rb") as handle:
            header = handle.read(544)
        layout = _nifti_layout(header, path)
        if layout is not None:
            _refuse_short(path, path.stat().st_size, layout[0] + layout[1], "the file holds")
    elif name.endswith(".nrrd"):
        layout = _nrrd_layout(path)
        if layout is None:
            return
        offset, need, encoding = layout
        available = path.stat().st_size - offset
        if encoding == "raw":
            _refuse_short(path, available, need, "its data holds")
            return
        if available * _MAX_DEFLATE_RATIO < need:
            raise _unreadable(path, f"its header declares {_bytes_text(need)} of data, more than its "
                                    f"{_bytes_text(available)} can hold (truncated, or a corrupt header)")
        _refuse_short(path, _gzip_length(path, offset, need), need, "its decompressed data holds")


# --- DICOM --------------------------------------------------------------------------------------
def check_slice_positions(positions: Sequence[float], files: Sequence[str], folder) -> None:
    """Refuse a DICOM series whose slice positions (mm along the slice normal, in file order) are not evenly
    spaced: a missing slice or uneven spacing would be placed on a wrong uniform grid."""
    positions = np.asarray(positions, dtype=float)
    if positions.size < 3:
        return
    gaps = np.diff(positions)
    if np.any(np.abs(gaps) < 1e-3):
        index = int(np.flatnonzero(np.abs(gaps) < 1e-3)[0])
        raise InputError(f"DICOM series in {folder} has two slices at the same position "
                         f"({Path(files[index]).name}, {Path(files[index + 1]).name})")
    step = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - step) > max(0.01 * abs(step), 1e-3))
    if uneven.size:
        index = int(uneven[0])
        missing = abs(gaps[index] / step) - 1
        hint = f" (about {missing:.0f} missing slice{'s' if round(missing) != 1 else ''})" if missing > 0.5 else ""
        raise InputError(
            f"DICOM series in {folder} has uneven slice spacing: {abs(gaps[index]):.3g} mm between "
            f"{Path(files[index]).name} and {Path(files[index + 1]).name}, {abs(step):.3g} mm elsewhere{hint}"
        )


# --- intensities --------------------------------------------------------------------------------
def check_intensities(array: np.ndarray, name, path=None) -> None:
    """Refuse an image with NaN / Inf voxels or without contrast (every voxel the same value). `path`: the file it
    was read from, whose own bytes are scanned too where the reader hides NaN (NIfTI)."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if path is not None:
            bad = max(bad, nifti_non_finite_voxels(path))
        if bad:
            raise InputError(f"{name} holds {bad:,} non-finite (NaN or Inf) intensities")
    if array.size and array.min() == array.max():
        raise InputError(f"{name} has no contrast: every voxel is {array.flat[0].item()!r}")
