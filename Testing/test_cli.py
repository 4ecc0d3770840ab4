"""The command line contract: flags, JSON on stdout, exit codes, geometry of the output, no output on failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from proxyprompt.cli import main
from proxyprompt.volume import Volume, read_image, read_label, write_image, write_label
from conftest import segment_args

BIN = Path(sys.executable).parent


def _segment_args(acdc, output, reference="patient001_ED", target="patient002_ED", extra=()):
    return ["segment", "--reference-image", str(acdc / f"{reference}_image.nii.gz"),
            "--reference-label", str(acdc / f"{reference}_label.nii.gz"), "--target",
            str(acdc / f"{target}_image.nii.gz"), "--output", str(output), "--generator", "registration",
            "--model", "none", "--quiet", *extra]


def test_segment_and_evaluate_end_to_end_through_the_console_command(acdc, tmp_path):
    output = tmp_path / "seg.seg.nrrd"
    run = subprocess.run([str(BIN / "proxyprompt"), *_segment_args(acdc, output), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)  # exactly one JSON object on stdout; logs went to stderr
    assert summary["output"] == str(output) and summary["generator"] == "registration"
    assert summary["model"] == "none" and summary["precision"] == "fp32"
    assert summary["slices"] == 10 and summary["seconds"]["total"] > 0
    assert summary["labels"] == {"1": "right ventricle", "2": "myocardium", "3": "left ventricle"}
    assert any(note.startswith("registration (intensity)") for note in summary["notes"])  # what the generator did
    assert summary["notes"][0] in run.stderr  # ... and the user sees it in the log too
    assert set(summary["quality"]) == {"1", "2", "3"}  # a per-structure quality estimate in --json
    assert all(0.0 <= entry["score"] <= 1.0 and "candidates" in entry for entry in summary["quality"].values())
    assert any(note.startswith("reference 1: registration kept ") for note in summary["notes"])  # the choice

    target = read_image(acdc / "patient002_ED_image.nii.gz")
    result, table = read_label(output)
    assert result.same_grid(target) and result.array.shape == target.array.shape
    assert set(np.unique(result.array)) <= {0, 1, 2, 3}
    assert table[3].name == "left ventricle"

    run = subprocess.run([str(BIN / "proxyprompt"), "evaluate", "--prediction", str(output), "--truth",
                          str(acdc / "patient002_ED_label.nii.gz"), "--json"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report["labels"]) == {"1", "2", "3"}
    assert report["labels"]["3"]["name"] == "left ventricle"
    assert 0.3 < report["mean_dice"] <= 1.0 and report["labels"]["3"]["dice"] > 0.5
    for row in report["labels"].values():
        assert {"dice", "hd95_mm", "volume_difference_ml"} <= set(row)


def test_output_keeps_an_oblique_target_grid_and_selected_labels(acdc, tmp_path):
    # Reference and target on different grids: the target is resampled to another spacing and origin, with an
    # oblique direction. The output must carry the target's exact geometry.
    source = read_image(acdc / "patient002_ED_image.nii.gz")
    rotation = np.array([[0.9, -0.4359, 0.0], [0.4359, 0.9, 0.0], [0.0, 0.0, 1.0]])
    oblique = Volume.from_geometry(source.array, (1.4, 1.7, 9.0), (-20.0, 35.0, 12.5), rotation)
    write_image(oblique, tmp_path / "target.nrrd")
    output = tmp_path / "out.nii.gz"
    args = _segment_args(acdc, output, extra=["--labels", "1,3"])
    args[args.index("--target") + 1] = str(tmp_path / "target.nrrd")
    assert main(args) == 0
    result, _ = read_label(output)
    assert result.size == oblique.size
    assert np.allclose(result.spacing, oblique.spacing) and np.allclose(result.origin, oblique.origin)
    assert np.allclose(result.direction, oblique.direction, atol=1e-5)
    assert set(np.unique(result.array)) <= {0, 1, 3} and 3 in np.unique(result.array)


def test_several_references_are_fused(acdc, tmp_path, capsys):
    output = tmp_path / "fused.nrrd"
    args = _segment_args(acdc, output, extra=["--json"])
    for reference in ("patient008_ED", "patient011_ED"):
        if not (acdc / f"{reference}_image.nii.gz").exists():
            pytest.skip(f"{reference} missing")
        args += ["--reference-image", str(acdc / f"{reference}_image.nii.gz"),
                 "--reference-label", str(acdc / f"{reference}_label.nii.gz")]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["references"] == 3
    assert read_label(output)[0].same_grid(read_image(acdc / "patient002_ED_image.nii.gz"))


# --- bad input: exit 2, a one-line reason, and no output file ---------------------------------------------
def _expect_bad_input(args, capsys, output, match):
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error and match in error[-1], error
    assert not output.exists()
    assert not [p for p in output.parent.glob(".partial-*")]


@pytest.fixture()
def small_case(tmp_path):
    image = Volume.from_geometry(np.random.default_rng(0).integers(0, 500, (6, 20, 20)).astype(np.int16),
                                 (1.5, 1.5, 8.0), (0, 0, 0))
    label = np.zeros((6, 20, 20), np.uint8)
    label[2:4, 5:12, 6:14] = 1
    write_image(image, tmp_path / "image.nii.gz")
    write_label(image.with_array(label), {}, tmp_path / "label.nii.gz")
    return tmp_path


def test_bad_inputs_give_exit_2_and_no_output(small_case, capsys):
    folder = small_case
    out = folder / "out.nii.gz"
    sitk.WriteImage(sitk.Image(20, 20, sitk.sitkInt16), str(folder / "flat.nii.gz"))
    sitk.WriteImage(sitk.Image([20, 20, 6, 2], sitk.sitkInt16), str(folder / "cine.nii.gz"))
    write_label(Volume.from_geometry(np.ones((6, 20, 21), np.uint8), (1.5, 1.5, 8.0), (0, 0, 0)), {},
                folder / "wide.nii.gz")
    write_label(Volume.from_geometry(np.zeros((6, 20, 20), np.uint8), (1.5, 1.5, 8.0), (0, 0, 0)), {},
                folder / "empty.nii.gz")
    (folder / "garbage.nii.gz").write_bytes(b"\x00garbage")

    _expect_bad_input(segment_args(folder, out, target="flat.nii.gz"), capsys, out, "2D")
    _expect_bad_input(segment_args(folder, out, target="cine.nii.gz"), capsys, out, "4D")
    _expect_bad_input(segment_args(folder, out, label="wide.nii.gz"), capsys, out, "does not match")
    _expect_bad_input(segment_args(folder, out, label="empty.nii.gz"), capsys, out, "empty")
    _expect_bad_input(segment_args(folder, out, extra=["--labels", "1,7"]), capsys, out, "lacks")
    _expect_bad_input(segment_args(folder, out, target="garbage.nii.gz"), capsys, out, "cannot read")
    _expect_bad_input(segment_args(folder, out, target="nowhere.nii.gz"), capsys, out, "not found")
    missing_folder_output = folder / "no" / "such" / "out.nii.gz"
    _expect_bad_input(segment_args(folder, missing_folder_output), capsys, missing_folder_output, "folder does not exist")
    _expect_bad_input(segment_args(folder, folder / "out.png"), capsys, folder / "out.png", "must end with")
    bad_model = segment_args(folder, out)
    bad_model[bad_model.index("--model") + 1] = "sam9000"
    _expect_bad_input(bad_model, capsys, out, "sam9000")


def test_too_large_target_is_refused_before_loading(small_case, capsys):
    (small_case / "huge.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 2048 2048 512\nElementSpacing = 1 1 1\n"
        "ElementType = MET_SHORT\nElementDataFile = huge.raw\n")
    out = small_case / "out.nii.gz"
    _expect_bad_input(segment_args(small_case, out, target="huge.mhd"), capsys, out, "limit")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["segment", "--target", "x"])
    assert stop.value.code == 2


def test_offline_download_fails_cleanly_and_leaves_no_file(tmp_path):
    # A proxy on a closed loopback port stands for "offline": no traffic leaves this machine.
    env = dict(os.environ, PROXYPROMPT_HOME=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", NO_PROXY="")
    run = subprocess.run([str(BIN / "proxyprompt"), "download", "sam2.1_hiera_tiny"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 2
    assert "download failed" in run.stderr.strip().splitlines()[-1]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".pt", ".part")]


def test_models_lists_the_registry_as_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYPROMPT_HOME", str(tmp_path))
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"sam2.1_hiera_tiny", "sam_vit_b", "litemedsam", "none", "random"} <= set(rows)
    assert rows["sam2.1_hiera_tiny"]["cached"] is False and rows["litemedsam"]["cached"] is True
