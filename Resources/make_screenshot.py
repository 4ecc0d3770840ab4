"""Renders a real ProxyPrompt result in a Slicer slice view, offscreen, with Slicer's own view code.

The module's Logic (ProxyPromptLib) segments ACDC patient002 ED from patient001 ED in a trame-slicer application
(Slicer's MRML scene, slice logic and displayable managers from slicer-core), and the axial slice view is written
as a PNG. trame-slicer needs its own stack, so this runs in its own virtual environment; the engine worker runs with
the project's Python (the Logic starts it with `--engine-python`):

    python3 -m venv /tmp/trame-venv && /tmp/trame-venv/bin/pip install "trame-slicer[standalone]==2.0.0"
    /tmp/trame-venv/bin/python Resources/make_screenshot.py --engine-python .venv/bin/python
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "Resources" / "Screenshots" / "ProxyPrompt-result.png"
COLORS = {1: (0.35, 0.55, 0.95), 2: (0.95, 0.75, 0.2), 3: (0.9, 0.3, 0.3)}  # RV, MYO, LV


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-python", required=True, help="Python with the engine's dependencies")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "acdc"))
    parser.add_argument("--reference", default="patient001_ED")
    parser.add_argument("--target", default="patient002_ED")
    parser.add_argument("--model", default="none")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args()

    from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLVolumeArchetypeStorageNode
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from vtkmodules.vtkIOImage import vtkPNGWriter
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
    from ProxyPromptLib.logic import ProxyPromptLogic

    data = Path(args.data)
    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    reference = app.io_manager.load_volumes(str(data / f"{args.reference}_image.nii.gz"))[0]
    target = app.io_manager.load_volumes(str(data / f"{args.target}_image.nii.gz"))[0]

    # The reference segmentation, as a user would have it: the label map imported into a segmentation node.
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "reference label")
    storage = vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(data / f"{args.reference}_label.nii.gz"))
    assert storage.ReadData(labelmap), "cannot read the reference label map"
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert app.segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    app.scene.RemoveNode(labelmap)
    names = json.loads((data / "labels.json").read_text())
    for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        segment = segmentation.GetSegmentation().GetNthSegment(index)
        value = segment.GetLabelValue() if segment.GetLabelValue() in COLORS else index + 1
        segment.SetName(names[str(value)])
        segment.SetColor(COLORS[value])
    segmentation.GetDisplayNode().SetVisibility(False)

    logic = ProxyPromptLogic(python=args.engine_python)
    try:
        result = logic.process(reference, segmentation, target, model=args.model)
    finally:
        logic.shutdown()
    print(json.dumps({k: logic.lastSummary[k] for k in ("generator", "model", "slices", "seconds")}))
    display = result.GetDisplayNode()
    display.SetOpacity2DFill(0.45)
    display.SetOpacity2DOutline(1.0)
    display.SetSliceIntersectionThickness(2)

    app.display_manager.show_volume_in_slice_background(target)
    view.render_window().SetSize(args.size, args.size)
    view.fit_view_to_content()
    low, high = view.get_slice_range()
    view.set_slice_value(low + 0.5 * (high - low))  # a mid-ventricular slice
    view.render()
    capture = vtkWindowToImageFilter()
    capture.SetInput(view.render_window())
    capture.ReadFrontBufferOff()
    capture.Update()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    writer = vtkPNGWriter()
    writer.SetFileName(str(args.output))
    writer.SetInputConnection(capture.GetOutputPort())
    writer.Write()
    print(args.output)


if __name__ == "__main__":
    main()
