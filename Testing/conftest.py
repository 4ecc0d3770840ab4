"""Shared fixtures: the real ACDC data beside the repository, small synthetic volumes."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ACDC = REPO.parent / "shared" / "data" / "acdc"


def pytest_configure(config):
    # tests never write reference features into the user's ~/.proxyprompt (inherited by the CLI subprocesses);
    # the feature-cache tests turn it on with a folder of their own
    os.environ.setdefault("PROXYPROMPT_FEATURE_CACHE_MB", "0")
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def acdc() -> Path:
    if not (ACDC / "labels.json").is_file():
        pytest.skip(f"shared ACDC data not found at {ACDC}")
    return ACDC


def oblique_direction(angle_degrees: float = 25.0, tilt_degrees: float = 10.0) -> np.ndarray:
    """A proper rotation (det +1) that is neither identity nor axis-aligned."""
    a, t = np.radians(angle_degrees), np.radians(tilt_degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return rz @ rx


def crop_slices(volume, first: int, count: int):
    """Slices first..first+count-1 along k, on the physically matching grid (origin moved, nothing resampled)."""
    from proxyprompt.volume import Volume

    matrix = np.array(volume.ijk_to_lps, dtype=float)
    matrix[:3, 3] = matrix[:3, :3] @ np.array([0.0, 0.0, first]) + matrix[:3, 3]
    return Volume(np.ascontiguousarray(volume.array[first : first + count]), matrix)


@pytest.fixture(scope="session")
def acdc_small_pair(acdc, tmp_path_factory) -> Path:
    """ACDC patient001 ED (reference) and patient002 ED (target), 4 slices each, as NRRD: quick, and real.

    reference.nrrd, reference_label.nrrd, target.nrrd, target_label.nrrd (ground truth), and target_oblique.nrrd /
    target_oblique_label.nrrd: the same target voxels on an oblique grid (rotated direction, moved origin).
    """
    from proxyprompt.volume import Volume, read_image, read_label, write_image

    folder = tmp_path_factory.mktemp("acdc_small_pair")
    reference = read_image(acdc / "patient001_ED_image.nii.gz")
    label, _ = read_label(acdc / "patient001_ED_label.nii.gz")
    target = read_image(acdc / "patient002_ED_image.nii.gz")
    truth, _ = read_label(acdc / "patient002_ED_label.nii.gz")
    write_image(crop_slices(reference, 3, 4), folder / "reference.nrrd")
    write_image(crop_slices(label, 3, 4), folder / "reference_label.nrrd")
    target, truth = crop_slices(target, 3, 4), crop_slices(truth, 3, 4)
    write_image(target, folder / "target.nrrd")
    write_image(truth, folder / "target_label.nrrd")
    direction = oblique_direction()
    oblique = Volume.from_geometry(target.array, target.spacing, np.array(target.origin) + [5.0, -3.0, 2.0],
                                   direction)
    write_image(oblique, folder / "target_oblique.nrrd")
    write_image(oblique.with_array(truth.array), folder / "target_oblique_label.nrrd")
    return folder


def segment_args(folder, output, image="image.nii.gz", label="label.nii.gz", target="image.nii.gz", extra=()):
    """`proxyprompt segment` arguments for the registration path (model none) on files in `folder`."""
    return ["segment", "--reference-image", str(folder / image), "--reference-label", str(folder / label),
            "--target", str(folder / target), "--output", str(output), "--model", "none",
            "--generator", "registration", "--quiet", *extra]
