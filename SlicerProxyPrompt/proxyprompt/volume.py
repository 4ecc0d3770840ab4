"""Volumes with their geometry, and reading / writing them without losing it.

A `Volume` is a numpy array indexed ``[k, j, i]`` (slowest axis first, as SimpleITK's
``GetArrayFromImage`` returns it) plus the 4x4 matrix ``ijk_to_lps`` that maps a voxel index
``(i, j, k, 1)`` to physical LPS millimetres (the ITK / DICOM convention). Slicer works in RAS:
the only conversion between the two is `lps_ras_flip`, used by `Volume.ijk_to_ras` and
`Volume.from_ijk_to_ras`.

Arrays inside a Volume are read-only, so that no step can modify an input by accident:
work on ``volume.array.copy()`` and wrap the result with `Volume.with_array`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write, check_output_folder
from .errors import InputError
from .integrity import check_file_complete, check_slice_positions

# diag(-1, -1, 1, 1): LPS <-> RAS. It is its own inverse.
_LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

# Image formats SimpleITK reads for us; DICOM is a folder.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")

# Geometry tolerance (mm for origin/spacing, unitless for direction cosines).
GRID_TOLERANCE = 1e-4


def lps_ras_flip(matrix_4x4: np.ndarray) -> np.ndarray:
    """Convert a 4x4 index->physical matrix between LPS and RAS (the same operation both ways)."""
    matrix_4x4 = np.asarray(matrix_4x4, dtype=float)
    if matrix_4x4.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got {matrix_4x4.shape}")
    return _LPS_RAS_FLIP @ matrix_4x4


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array ``[k, j, i]`` and its index->LPS 4x4 matrix."""

    array: np.ndarray
    ijk_to_lps: np.ndarray

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InputError(f"expected a 3D volume, got an array of shape {self.array.shape}")
        matrix = np.asarray(self.ijk_to_lps, dtype=float)
        if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
            raise ValueError("ijk_to_lps must be a 4x4 affine matrix")
        if not np.all(np.isfinite(matrix)):
            raise InputError("the volume's geometry (spacing, origin or direction) holds NaN or Inf")
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise InputError("the volume's index-to-physical matrix is singular (zero spacing?)")
        object.__setattr__(self, "array", _read_only(self.array))
        object.__setattr__(self, "ijk_to_lps", _read_only(matrix.copy()))

    # --- geometry -------------------------------------------------------------------------------
    @property
    def size(self) -> Tuple[int, int, int]:
        """Number of voxels along (i, j, k), as SimpleITK's GetSize()."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_lps[:3, :3], axis=0))

    @property
    def origin(self) -> Tuple[float, float, float]:
        return tuple(float(o) for o in self.ijk_to_lps[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """3x3 direction cosines; column c is the LPS direction of index axis c (i, j, k)."""
        return self.ijk_to_lps[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return lps_ras_flip(self.ijk_to_lps)

    @classmethod
    def from_geometry(cls, array: np.ndarray, spacing, origin, direction=None) -> "Volume":
        direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
        matrix = np.eye(4)
        matrix[:3, :3] = direction * np.asarray(spacing, dtype=float)[None, :]
        matrix[:3, 3] = np.asarray(origin, dtype=float)
        return cls(np.asarray(array), matrix)

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> "Volume":
        """Build from a Slicer-style RAS matrix (e.g. ``GetIJKToRASMatrix``)."""
        return cls(np.asarray(array), lps_ras_flip(ijk_to_ras))

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new volume on the same grid with another array (same shape required)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.ijk_to_lps)

    def same_grid(self, other: "Volume", tolerance: float = GRID_TOLERANCE) -> bool:
        return self.array.shape == other.array.shape and bool(
            np.allclose(self.ijk_to_lps, other.ijk_to_lps, atol=tolerance)
        )

    def describe_grid(self) -> str:
        return (
            f"size {self.size}, spacing {tuple(round(s, 4) for s in self.spacing)}, "
            f"origin {tuple(round(o, 3) for o in self.origin)}, "
            f"direction {tuple(round(float(c), 4) + 0.0 for c in self.direction.ravel())}"
        )

    # --- SimpleITK bridge -----------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        if image.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got a {image.GetDimension()}D image")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        return cls.from_geometry(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.asarray(image.GetDirection()).reshape(3, 3),
        )

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image


# --- label tables -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelInfo:
    name: str
    color: Tuple[float, float, float] = (0.5, 0.5, 0.5)  # RGB in [0, 1]


LabelTable = Dict[int, LabelInfo]

# Distinct, readable colours for labels that come without one (Slicer-like palette).
_PALETTE = [
    (0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.39), (0.43, 0.72, 0.82),
    (0.85, 0.4, 0.33), (0.56, 0.57, 0.86), (0.86, 0.73, 0.34), (0.74, 0.45, 0.7),
]


def default_label_info(value: int) -> LabelInfo:
    return LabelInfo(f"label {value}", _PALETTE[(value - 1) % len(_PALETTE)])


def complete_label_table(table: Optional[LabelTable], values) -> LabelTable:
    """A table with an entry for every value in `values` (given entries kept)."""
    table = dict(table or {})
    return {int(v): table.get(int(v), default_label_info(int(v))) for v in sorted(int(v) for v in values)}


def read_label_table(path) -> LabelTable:
    """Read a label table from a JSON file or a Slicer colour table (``.ctbl`` / ``.txt``).

    JSON: ``{"1": "right ventricle", ...}`` or ``{"1": {"name": ..., "color": [r, g, b]}, ...}``
    (colours in 0..1 or 0..255). Colour table: lines ``value name r g b a`` (0..255).
    """
    path = checked_path(path)
    if not path.is_file():
        raise InputError(f"label table not found: {path}")
    table: LabelTable = {}
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise InputError(f"label table {path} must be a JSON object "
                                 f'{{"<value>": "<name>" or {{"name": ..., "color": [r, g, b]}}}}, not a {_json_kind(raw)}')
            for key, entry in raw.items():
                value = _label_value(key, path)
                if isinstance(entry, str):
                    table[value] = LabelInfo(entry, default_label_info(value).color)
                elif isinstance(entry, dict) and "name" in entry:
                    color = entry.get("color") or default_label_info(value).color
                    table[value] = LabelInfo(str(entry["name"]), _normalise_color(color))
                else:
                    raise InputError(f"label table {path}: the entry of label {key} must be a name or an object "
                                     f"with a name, not a {_json_kind(entry)}")
        else:
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                value = _label_value(parts[0], path)
                if value == 0:
                    continue  # background
                table[value] = LabelInfo(parts[1], _normalise_color([float(c) for c in parts[2:5]]))
    except InputError:
        raise
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise InputError(f"cannot read label table {path}: {error}") from None
    except OSError as error:
        raise InputError(f"cannot read label table {path}: {error.strerror or error}") from None
    return table


# Label values are stored as uint16 (NIfTI / NRRD outputs, the engine's label stacks).
MAX_LABEL_VALUE = 65535


def _label_value(text, path) -> int:
    value = int(text)
    if not 0 <= value <= MAX_LABEL_VALUE:
        raise InputError(f"label table {path}: label value {value} is outside 0..{MAX_LABEL_VALUE}")
    return value


def _json_kind(value) -> str:
    return {list: "list", dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _normalise_color(color) -> Tuple[float, float, float]:
    if not isinstance(color, (list, tuple)) or len(color) < 3:
        raise ValueError(f"a colour is three numbers, got {color!r}")
    rgb = [float(c) for c in list(color)[:3]]
    if not all(np.isfinite(rgb)) or min(rgb) < 0:
        raise ValueError(f"a colour is three numbers in 0..1 or 0..255, got {color!r}")
    if max(rgb) > 1.0:
        rgb = [c / 255.0 for c in rgb]
    return (rgb[0], rgb[1], rgb[2])


def write_label_table(table: LabelTable, path) -> None:
    payload = {str(v): {"name": info.name, "color": list(info.color)} for v, info in sorted(table.items())}
    text = json.dumps(payload, indent=1)

    def verify(temporary: str) -> None:
        if Path(temporary).read_text(encoding="utf-8") != text:
            raise InputError("the label table read back differs from the one written")

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), verify)


# --- reading ------------------------------------------------------------------------------------
def checked_path(path) -> Path:
    """`path` as a Path, refused when it cannot be passed to SimpleITK: a name that is not valid UTF-8 (bytes
    decoded under a C locale) makes its C++ layer abort the process."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"path {str(path)!r} is not valid UTF-8; rename it (or run under a UTF-8 locale)") from None
    return path


def _is_seg_nrrd(path: Path) -> bool:
    return path.name.lower().endswith(".seg.nrrd")


# Largest volume read (voxels): ~4 GB as float32 frames, beyond what a 24 GB workstation runs models on.
MAX_VOXELS = 1024 * 1024 * 1024


def _check_voxel_count(path, size, max_voxels) -> None:
    voxels = int(np.prod([int(s) for s in size]))
    if max_voxels is not None and voxels > max_voxels:
        raise InputError(
            f"{path} has {voxels:,} voxels ({' x '.join(map(str, size))}), more than the limit of {max_voxels:,}; "
            "crop or downsample it first"
        )


def read_image(path, max_voxels: Optional[int] = MAX_VOXELS) -> Volume:
    """Read a 3D scalar image: NIfTI, NRRD, MHA/MHD, or a folder holding one DICOM series.

    The header is read first, and volumes over `max_voxels` are refused before their voxels are loaded.
    """
    path = checked_path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"no DICOM series in folder {path}")
            if len(series) > 1:
                raise InputError(f"{len(series)} DICOM series in {path}; point to a folder with one series")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            _check_dicom_spacing(files, path)
            reader.SetFileNames(files)
            image = reader.Execute()
            _check_voxel_count(path, image.GetSize(), max_voxels)
        else:
            check_file_complete(path)  # ITK zero-fills short or corrupt data and reports success
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()  # header only: refuse oversized volumes before loading them
            _check_voxel_count(path, reader.GetSize(), max_voxels)
            image = reader.Execute()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()
        raise InputError(f"cannot read {path}: {reason[-1] if reason else 'unknown error'}") from None
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(image.GetSize()) < 1):
        raise InputError(f"{path} is a 2D image; a 3D volume is needed")
    if image.GetDimension() != 3:
        raise InputError(f"{path} is a {image.GetDimension()}D image; a 3D volume is needed")
    try:
        return Volume.from_sitk(image)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None


def _check_dicom_spacing(files, folder) -> None:
    """Slice positions along the slice normal (ImagePositionPatient . normal of ImageOrientationPatient) must be
    evenly spaced: ITK would put the slices of a series with a gap onto a uniform grid."""
    positions = []
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey("0020|0032") and reader.HasMetaDataKey("0020|0037")):
            return  # no positions to check (not a tomographic series)
        try:
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        except ValueError:
            return
        if len(position) != 3 or len(orientation) != 6:
            return
        normal = np.cross(orientation[:3], orientation[3:])
        positions.append(float(np.dot(normal, position)))
    check_slice_positions(positions, files, folder)


def read_label(path, label_table_path=None) -> Tuple[Volume, LabelTable]:
    """Read a label map and its label table.

    ``.seg.nrrd`` (Slicer segmentation): read with slicerio, names and colours from the file.
    Other formats: an integer image; the table comes from `label_table_path`, else from a
    ``labels.json`` beside the file, else default names ("label N").
    """
    path = checked_path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if _is_seg_nrrd(path):
        volume, table = _read_seg_nrrd(path)
    else:
        volume = read_image(path)
        if not np.issubdtype(volume.array.dtype, np.integer):
            values = volume.array
            if not np.all(np.equal(np.mod(values, 1), 0)):
                raise InputError(f"{path} is not a label map (non-integer values)")
            if values.size and values.max() > MAX_LABEL_VALUE:
                raise InputError(f"{path} has label values up to {values.max():.0f}; at most {MAX_LABEL_VALUE} "
                                 "are supported")
            volume = volume.with_array(values.astype(np.int32))
        if volume.array.min() < 0:
            raise InputError(f"{path} has negative label values")
        table = {}
        sidecar = path.parent / "labels.json"
        if label_table_path is None and sidecar.is_file():
            label_table_path = sidecar
        if label_table_path is not None:
            table = read_label_table(label_table_path)
    if volume.array.size and volume.array.max() > MAX_LABEL_VALUE:
        raise InputError(f"{path} has label values up to {int(volume.array.max())}; at most {MAX_LABEL_VALUE} "
                         "are supported")
    if label_table_path is not None and _is_seg_nrrd(path):
        table.update(read_label_table(label_table_path))
    present = [int(v) for v in np.unique(volume.array) if v != 0]
    return volume, complete_label_table(table, present)


def _read_seg_nrrd(path: Path) -> Tuple[Volume, LabelTable]:
    import slicerio

    check_file_complete(path)
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # slicerio/pynrrd raise many types for broken files
        raise InputError(f"cannot read segmentation {path}: {error}") from error
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim == 4:
        # Several layers (overlapping segments): flatten in layer order; later layers win.
        flat = np.zeros(voxels.shape[:3], dtype=np.int32)
        by_layer: Dict[int, list] = {}
        for segment in segmentation["segments"]:
            by_layer.setdefault(int(segment.get("layer", 0)), []).append(segment)
        table: LabelTable = {}
        next_value = 1
        for layer, segments in sorted(by_layer.items()):
            for segment in segments:
                flat[voxels[..., layer] == int(segment["labelValue"])] = next_value
                table[next_value] = _segment_info(segment, next_value)
                next_value += 1
        voxels_kji = np.transpose(flat, (2, 1, 0))
    else:
        table = {int(s["labelValue"]): _segment_info(s, int(s["labelValue"])) for s in segmentation["segments"]}
        voxels_kji = np.transpose(voxels, (2, 1, 0))  # slicerio gives [i, j, k]
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=float)
    return Volume(np.ascontiguousarray(voxels_kji), ijk_to_lps), table


def _segment_info(segment: dict, value: int) -> LabelInfo:
    color = segment.get("color") or default_label_info(value).color
    return LabelInfo(str(segment.get("name") or f"label {value}"), _normalise_color(color))


# --- writing (atomic and verified: a failed write leaves nothing behind) ---------------------------
def check_output_path(path, suffixes=LABEL_OUTPUT_SUFFIXES) -> Path:
    """Validate an output path before any work is done (suffix, folder, name length, writable)."""
    path = checked_path(path)
    if not any(path.name.lower().endswith(s) for s in suffixes):
        raise InputError(f"output {path} must end with one of {', '.join(suffixes)}")
    check_output_folder(path)
    return path


# Where an output says how it was made (e.g. with random weights): NIfTI's 80-character `descrip` field
# (ITK's "ITK_FileNotes"), a key:=value field in NRRD and .seg.nrrd headers.
NIFTI_NOTE_KEY = "ITK_FileNotes"
NRRD_NOTE_KEY = "ProxyPrompt_note"


def read_output_note(path) -> str:
    """The note `write_label(..., note=...)` stored in a file ("" when none)."""
    path = checked_path(path)
    if _is_seg_nrrd(path):
        import slicerio

        return str(slicerio.read_segmentation(str(path), skip_voxels=True).get(NRRD_NOTE_KEY, ""))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    for key in (NRRD_NOTE_KEY, "descrip"):
        if reader.HasMetaDataKey(key):
            return reader.GetMetaData(key).strip()
    return ""


def _verify_written(volume: Volume, seg_nrrd: bool):
    """A check of a just-written file: complete stream, and the array and grid read back are what was written."""

    def verify(temporary: str) -> None:
        check_file_complete(temporary)
        if seg_nrrd:
            again, _ = _read_seg_nrrd(Path(temporary))
        else:
            try:
                again = Volume.from_sitk(sitk.ReadImage(temporary))
            except RuntimeError as error:
                raise InputError(str(error).strip().splitlines()[-1]) from None
        if again.array.shape != volume.array.shape or not np.array_equal(
                again.array, volume.array, equal_nan=np.issubdtype(volume.array.dtype, np.floating)):
            raise InputError(f"the voxels read back differ from those written ({again.array.shape} vs "
                             f"{volume.array.shape})")
        if not again.same_grid(volume, tolerance=1e-3):
            raise InputError("the grid read back differs from the one written")

    return verify


def write_image(volume: Volume, path, note: str = "") -> Path:
    image = volume.to_sitk()
    if note:
        image.SetMetaData(NIFTI_NOTE_KEY if ".nii" in Path(path).name.lower() else NRRD_NOTE_KEY, note)
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True), _verify_written(volume, False))


def write_label(volume: Volume, table: LabelTable, path, note: str = "") -> Path:
    """Write a label map as NIfTI / NRRD, or as a Slicer ``.seg.nrrd`` with names and colours. `note` (e.g. that
    the model had random weights) goes into the file's header (`read_output_note`)."""
    path = checked_path(path)
    largest = int(volume.array.max(initial=0))
    if largest > MAX_LABEL_VALUE or volume.array.min(initial=0) < 0:
        raise InputError(f"label values must be in 0..{MAX_LABEL_VALUE} to be written, got up to {largest}")
    labels = volume.with_array(volume.array.astype(np.uint8 if largest < 256 else np.uint16))
    if _is_seg_nrrd(path):
        return atomic_write(path, lambda tmp: _write_seg_nrrd(labels, table, tmp, note), _verify_written(labels, True))
    return write_image(labels, path, note)


def _write_seg_nrrd(volume: Volume, table: LabelTable, path, note: str = "") -> None:
    import slicerio

    present = sorted(int(v) for v in np.unique(volume.array) if v != 0)
    table = complete_label_table(table, set(present) | set(table))
    segments = []
    for value, info in sorted(table.items()):
        segments.append(
            {"id": f"Segment_{value}", "labelValue": value, "layer": 0, "name": info.name, "color": list(info.color)}
        )
    segmentation = {
        "voxels": np.ascontiguousarray(np.transpose(volume.array, (2, 1, 0))),
        "ijkToLPS": np.asarray(volume.ijk_to_lps, dtype=float),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "segments": segments,
    }
    if note:
        segmentation[NRRD_NOTE_KEY] = note
    slicerio.write_segmentation(str(path), segmentation)
