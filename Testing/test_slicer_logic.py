"""The Slicer module's Logic on Slicer's real MRML core (the `slicer-core` wheel), driven exactly as from Slicer's
Python console: real scene, volume and segmentation nodes, storage, oblique geometry, and the `proxyprompt serve`
worker as a real subprocess."""

import py_compile
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import os

from conftest import REPO

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML core wheel) is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

SHARED = REPO.parent / "shared"
MODULE = REPO / "SlicerProxyPrompt"
sys.path.insert(0, str(SHARED / "slicer-headless"))
sys.path.insert(0, str(MODULE))

import slicer_env  # noqa: E402  (the environment the acceptance checks build)
import vtk  # noqa: E402
from ProxyPromptLib.logic import ProxyPromptCancelled, ProxyPromptError, ProxyPromptLogic  # noqa: E402

NAMES = ["right ventricle", "myocardium", "left ventricle"]
COLORS = [(0.85, 0.2, 0.2), (0.3, 0.8, 0.3), (0.2, 0.4, 0.9)]
LV_TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
                  "SCT^87878005^Left ventricle~^^~~^^~^^")


@pytest.fixture(scope="module")
def logic():
    """One Logic (one engine worker) for the whole module, as in a Slicer session."""
    instance = ProxyPromptLogic()
    yield instance
    instance.shutdown()


@pytest.fixture()
def scene():
    return slicer_env.setup()


def load_case(pair, target="target"):
    """Reference volume + segmentation (names, colours, one terminology) and the target, loaded as in Slicer."""
    reference = slicer.util.loadVolume(str(pair / "reference.nrrd"), {"name": "reference"})
    labelmap = slicer.util.loadLabelVolume(str(pair / "reference_label.nrrd"), {"name": "reference_label"})
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
    slicer.mrmlScene.RemoveNode(labelmap.GetDisplayNode().GetColorNode())
    slicer.mrmlScene.RemoveNode(labelmap)
    ids = list(segmentation.GetSegmentation().GetSegmentIDs())
    assert len(ids) == 3
    for segmentId, name, color in zip(ids, NAMES, COLORS):
        segment = segmentation.GetSegmentation().GetSegment(segmentId)
        segment.SetName(name)
        segment.SetColor(color)
    segmentation.GetSegmentation().GetSegment(ids[2]).SetTerminology(LV_TERMINOLOGY)
    targetVolume = slicer.util.loadVolume(str(pair / f"{target}.nrrd"), {"name": target})
    return reference, segmentation, targetVolume


def scene_state(scene):
    """Every node (ID, class, name) and every segment's voxels: what 'the scene is unchanged' compares."""
    state = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        entry = [node.GetID(), node.GetClassName(), node.GetName()]
        if node.IsA("vtkMRMLSegmentationNode"):
            for segmentId in node.GetSegmentation().GetSegmentIDs():
                segment = node.GetSegmentation().GetSegment(segmentId)
                voxels = slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, segmentId)
                entry.append((segmentId, segment.GetName(), tuple(segment.GetColor()),
                              None if voxels is None else (voxels.shape, int(voxels.sum()), voxels.tobytes())))
        if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
            entry.append(slicer.util.arrayFromVolume(node).tobytes())
        state.append(tuple(entry))
    return state


def labels_on(segmentation, target, names=NAMES):
    """The output node as one label array on the target grid: value n+1 = names[n]."""
    labels = np.zeros(slicer.util.arrayFromVolume(target).shape, np.uint8)
    for value, name in enumerate(names, start=1):
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
        labels[slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, target) > 0] = value
    return labels


def ijk_to_ras(volume):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def cli_labels(pair, target, tmp_path, model="none", extra=()):
    output = tmp_path / "cli.nrrd"
    subprocess.run([sys.executable, "-m", "proxyprompt.cli", "segment", "--reference-image", str(pair / "reference.nrrd"),
                    "--reference-label", str(pair / "reference_label.nrrd"), "--target", str(pair / f"{target}.nrrd"),
                    "--output", str(output), "--model", model, "--quiet", *extra], check=True,
                   env={**os.environ, "PYTHONPATH": str(MODULE)})
    from proxyprompt.volume import read_label

    return read_label(output)[0].array


def assert_output_like_reference(output, reference_segmentation, target):
    segmentation = output.GetSegmentation()
    names = [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()]
    assert names == NAMES
    for name, color in zip(NAMES, COLORS):
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        assert np.allclose(segment.GetColor(), color)
    lv = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("left ventricle"))
    assert lv.GetTerminology() == LV_TERMINOLOGY
    # every segment's own labelmap lies on the target's grid (oblique matrices included)
    for segmentId in segmentation.GetSegmentIDs():
        image = segmentation.GetSegment(segmentId).GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        assert np.allclose(slicer.util.arrayFromVTKMatrix(matrix), ijk_to_ras(target), atol=1e-5)


@pytest.mark.parametrize("target", ["target", "target_oblique"])
def test_registration_path_gives_the_cli_result_with_names_colours_terminology_on_the_target_grid(
        logic, scene, acdc_small_pair, tmp_path, target):
    reference, reference_segmentation, target_volume = load_case(acdc_small_pair, target)
    before_inputs = scene_state(scene)
    events = []
    output = logic.process(reference, reference_segmentation, target_volume, model="none", progressCallback=events.append)
    assert output.IsA("vtkMRMLSegmentationNode") and output.GetScene() is scene
    assert_output_like_reference(output, reference_segmentation, target_volume)
    assert {event.phase for event in events} >= {"read", "write"}
    # inputs untouched, and the only new nodes are the output and its display node
    after = {entry[0]: entry for entry in scene_state(scene)}
    for entry in before_inputs:
        assert after[entry[0]] == entry
    assert set(after) - {entry[0] for entry in before_inputs} == {output.GetID(), output.GetDisplayNode().GetID()}
    labels = labels_on(output, target_volume)
    assert labels.any()
    assert np.array_equal(labels, cli_labels(acdc_small_pair, target, tmp_path))


def test_rerun_keeps_the_users_corrected_slices_exactly_and_updates_the_node_in_place(logic, scene, acdc_small_pair):
    reference, reference_segmentation, target_volume = load_case(acdc_small_pair)
    output = logic.process(reference, reference_segmentation, target_volume, model="none")
    first = labels_on(output, target_volume)
    truth = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(acdc_small_pair / "target_label.nrrd")))
    corrected = [1, 2]
    assert any(not np.array_equal(first[k], truth[k]) for k in corrected), "nothing to correct on these slices"
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSegmentEditorNode(editor_node)
    editor.SetSegmentationNode(output)
    for value, name in enumerate(NAMES, start=1):  # the user paints the ground truth into 2 slices
        segmentId = output.GetSegmentation().GetSegmentIdBySegmentName(name)
        mask = (first == value).astype(np.uint8)
        for k in corrected:
            mask[k] = truth[k] == value
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, output, segmentId, target_volume)
    edited = labels_on(output, target_volume)
    logic.segmentEditorLogic = editor
    try:
        again = logic.process(reference, reference_segmentation, target_volume, outputSegmentation=output,
                              model="none")
    finally:
        logic.segmentEditorLogic = None
    assert again is output  # same node, segments matched by name
    assert logic.lastSummary["corrected_slices"] == corrected
    result = labels_on(output, target_volume)
    for k in corrected:
        assert np.array_equal(result[k], truth[k])
    assert [output.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)] == NAMES
    editor.Undo()  # the state saved before the re-run wrote into the node
    assert np.array_equal(labels_on(output, target_volume), edited)


def test_several_references_are_matched_by_segment_name(logic, scene, acdc_small_pair):
    reference, reference_segmentation, target_volume = load_case(acdc_small_pair)
    second_volume = slicer.util.loadVolume(str(acdc_small_pair / "target_oblique.nrrd"), {"name": "second reference"})
    second = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "second reference segmentation")
    second.SetReferenceImageGeometryParameterFromVolumeNode(second_volume)
    truth = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(acdc_small_pair / "target_oblique_label.nrrd")))
    for value, name in reversed(list(enumerate(NAMES, start=1))):  # other order than the reference's segments
        segment_id = second.GetSegmentation().AddEmptySegment("", name)
        slicer.util.updateSegmentBinaryLabelmapFromArray((truth == value).astype(np.uint8), second, segment_id,
                                                         second_volume)
    output = logic.process(reference, reference_segmentation, target_volume, model="none",
                           options={"extraReferences": [(second_volume, second)]})
    assert logic.lastSummary["references"] == 2
    assert [output.GetSegmentation().GetNthSegment(i).GetName() for i in range(3)] == NAMES
    # the second reference is the target itself (on another grid): fused with it, the result moves towards the truth
    fused = labels_on(output, target_volume)
    alone = labels_on(logic.process(reference, reference_segmentation, target_volume, model="none"), target_volume)
    truth_on_target = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(acdc_small_pair / "target_label.nrrd")))
    assert (fused == truth_on_target).mean() > (alone == truth_on_target).mean()
    second.GetSegmentation().GetNthSegment(0).SetName("something else")
    before = scene_state(scene)
    with pytest.raises(ProxyPromptError, match="has no segment named 'left ventricle'"):
        logic.process(reference, reference_segmentation, target_volume, model="none",
                      options={"extraReferences": [(second_volume, second)]})
    assert scene_state(scene) == before


def test_sam2_path_through_the_worker_reuses_the_target_features(logic, scene, acdc_small_pair, tmp_path):
    reference, reference_segmentation, target_volume = load_case(acdc_small_pair)
    lv = reference_segmentation.GetSegmentation().GetSegmentIdBySegmentName("left ventricle")
    options = {"image_size": 512}
    output = logic.process(reference, reference_segmentation, target_volume, segmentIds=[lv], model="random",
                           options=options)
    first = dict(logic.lastSummary)
    assert first["random_weights"] is True and first["model"] == "random"
    segmentation = output.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["left ventricle"]
    assert segmentation.GetNthSegment(0).GetTerminology() == LV_TERMINOLOGY
    second_output = logic.process(reference, reference_segmentation, target_volume, segmentIds=[lv], model="random",
                                  options=options)
    assert second_output is not output
    assert logic.lastSummary["encoder_calls"] == first["encoder_calls"]  # zero new encoder calls
    assert np.array_equal(labels_on(second_output, target_volume, ["left ventricle"]),
                          labels_on(output, target_volume, ["left ventricle"]))


def test_cancel_mid_run_leaves_the_scene_unchanged(logic, scene, acdc_small_pair):
    reference, reference_segmentation, target_volume = load_case(acdc_small_pair, "target_oblique")
    lv = reference_segmentation.GetSegmentation().GetSegmentIdBySegmentName("left ventricle")
    before = scene_state(scene)
    folders_before = set(Path(tempfile.gettempdir()).glob("ProxyPrompt-*"))
    seen = []

    def cancel_once_running(event):
        seen.append(event.phase)
        logic.cancel()  # at the first progress event: the worker has started the job (a second call is a no-op)

    with pytest.raises(ProxyPromptCancelled, match="cancelled"):
        logic.process(reference, reference_segmentation, target_volume, segmentIds=[lv], model="random",
                      options={"image_size": 512}, progressCallback=cancel_once_running)
    assert seen and "write" not in seen
    assert scene_state(scene) == before
    assert set(Path(tempfile.gettempdir()).glob("ProxyPrompt-*")) == folders_before  # temporary files removed
    assert not logic.isRunning()


def _bad_inputs(scene, pair):
    reference, reference_segmentation, target_volume = load_case(pair)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    no_voxels = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no voxels")
    no_voxels.GetSegmentation().AddEmptySegment("blank", "blank")
    flat = slicer.util.addVolumeFromArray(np.zeros((1, 20, 20), np.int16), name="flat")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    moved = slicer.util.addVolumeFromArray(np.ones((4, 20, 20), np.int16), name="moved target")
    moved.SetAndObserveTransformNodeID(transform.GetID())
    return {
        "has no segments": (reference, empty, target_volume, {}),
        "is empty": (reference, no_voxels, target_volume, {}),
        "does not exist": (reference, reference_segmentation, target_volume, {"segmentIds": ["Segment_nope"]}),
        "is 2D": (reference, reference_segmentation, flat, {}),
        "is the reference volume": (reference, reference_segmentation, reference, {}),
        "under the transform": (reference, reference_segmentation, moved, {}),
        "unknown request field": (reference, reference_segmentation, target_volume, {"options": {"bogus": 1}}),
        "set by the Logic": (reference, reference_segmentation, target_volume, {"options": {"target": "x.nrrd"}}),
    }


@pytest.mark.parametrize("reason", ["has no segments", "is empty", "does not exist", "is 2D", "is the reference volume",
                                    "under the transform", "unknown request field", "set by the Logic"])
def test_bad_inputs_give_a_one_line_reason_and_leave_the_scene_unchanged(logic, scene, acdc_small_pair, reason):
    reference, segmentation, target, extra = _bad_inputs(scene, acdc_small_pair)[reason]
    before = scene_state(scene)
    with pytest.raises(ProxyPromptError, match=reason) as raised:
        logic.process(reference, segmentation, target, model="none", **extra)
    assert "\n" not in str(raised.value)
    assert scene_state(scene) == before


def test_a_crashed_worker_gives_a_clear_error_and_is_restarted(scene, acdc_small_pair):
    crashing = ProxyPromptLogic()
    try:
        reference, reference_segmentation, target_volume = load_case(acdc_small_pair)
        before = scene_state(scene)

        def kill_worker(event):
            crashing.worker.process.kill()

        with pytest.raises(ProxyPromptError, match="engine worker stopped"):
            crashing.process(reference, reference_segmentation, target_volume, model="none",
                             progressCallback=kill_worker)
        assert scene_state(scene) == before
        output = crashing.process(reference, reference_segmentation, target_volume, model="none")
        assert output.GetSegmentation().GetNumberOfSegments() == 3
    finally:
        crashing.shutdown()


def test_a_worker_that_does_not_stop_is_killed_after_the_grace_time(scene, acdc_small_pair, monkeypatch):
    import ProxyPromptLib.logic as logic_module

    monkeypatch.setattr(logic_module, "CANCEL_GRACE_SECONDS", 0.0)
    stubborn = ProxyPromptLogic()
    try:
        reference, reference_segmentation, target_volume = load_case(acdc_small_pair)
        before = scene_state(scene)

        def cancel_without_telling_the_worker(event):
            stubborn._job.cancelRequestedAt = 0.0  # as if the cancel request had been ignored for a long time

        with pytest.raises(ProxyPromptCancelled):
            stubborn.process(reference, reference_segmentation, target_volume, model="none",
                             progressCallback=cancel_without_telling_the_worker)
        assert stubborn.worker is None  # killed; the next run starts a new one
        assert scene_state(scene) == before
    finally:
        stubborn.shutdown()


def test_an_exception_in_the_progress_callback_stops_the_run_and_frees_the_logic(logic, scene, acdc_small_pair):
    reference, reference_segmentation, target_volume = load_case(acdc_small_pair)
    before = scene_state(scene)

    def fail(event):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        logic.process(reference, reference_segmentation, target_volume, model="none", progressCallback=fail)
    assert not logic.isRunning()
    assert scene_state(scene) == before
    output = logic.process(reference, reference_segmentation, target_volume, model="none")
    assert output.GetSegmentation().GetNumberOfSegments() == 3


def test_module_files_byte_compile_and_use_only_known_slicer_apis():
    files = sorted(MODULE.glob("*.py")) + sorted((MODULE / "ProxyPromptLib").glob("*.py"))
    assert MODULE / "ProxyPromptLib" / "logic.py" in files
    for path in files:
        py_compile.compile(str(path), doraise=True)
    checker = SHARED / "slicer-api" / "check_slicer_api.py"
    if not checker.is_file():
        pytest.skip("the Slicer API index is not beside the repository")
    run = subprocess.run([sys.executable, str(checker), "--index", str(SHARED / "slicer-api" / "slicer_api.json"),
                          "--min-version", "5.10", *map(str, files)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 flagged" in run.stdout or "flagged: 0" in run.stdout or "FLAG" not in run.stdout, run.stdout
