"""ProxyPrompt: segment a target volume from one annotated reference case (3D Slicer scripted module).

The module only wires the UI to the Logic. The Logic (`ProxyPromptLib/logic.py`, no Qt) turns nodes into files and
back and drives the engine worker (`proxyprompt serve`), which does all model math in its own process. Nothing is
installed or downloaded at import or in a constructor: dependencies and weights come on explicit clicks.
"""

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import threading

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ProxyPromptLib.logic import ProxyPromptCancelled, ProxyPromptError
from ProxyPromptLib.logic import ProxyPromptLogic as EngineLogic

MODULE_FOLDER = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["auto", "cuda", "mps", "cpu"]
SLICE_AXES = {"auto": None, "k (slowest array axis)": 0, "j": 1, "i (fastest array axis)": 2}
KNOWN_GENERATORS = ["registration", "support-memory"]  # shown when the engine's list cannot be read yet


#
# ProxyPrompt
#
class ProxyPrompt(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ProxyPrompt"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ProxyPrompt contributors"]
        self.parent.helpText = (
            "Segment a target volume from one annotated reference case: pick the reference volume and segmentation, "
            "the target, and click Segment. Fix slices in the Segment Editor and click Segment again with the same "
            "output: the corrected slices are kept exactly and guide the rest. "
            "See the <a href='https://github.com/ProxyPrompt/SlicerProxyPrompt#readme'>README</a>.")
        self.parent.acknowledgementText = "Built on SAM 2 / segment-anything, SimpleITK and 3D Slicer."


#
# Parameter node
#
@parameterNodeWrapper
class ProxyPromptParameterNode:
    referenceVolume: vtkMRMLScalarVolumeNode
    referenceSegmentation: vtkMRMLSegmentationNode
    targetVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    extraReferenceVolume: vtkMRMLScalarVolumeNode
    extraReferenceSegmentation: vtkMRMLSegmentationNode
    generator: str = "auto"
    model: str = "auto"
    device: str = "auto"
    sliceAxis: str = "auto"
    imageSize: int = 0


#
# Widget: wiring only
#
class ProxyPromptWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._generatorDescriptions = {}
        self._download = None  # {"thread", "cancel", "done", "total", "error", "model"} while a download runs

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ProxyPrompt.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ProxyPromptLogic()

        self._fillChoices()
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(200)
        self.pollTimer.connect("timeout()", self.onPollTimer)
        self.downloadTimer = qt.QTimer()
        self.downloadTimer.setInterval(300)
        self.downloadTimer.connect("timeout()", self.onDownloadTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownloadButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.showCacheButton.connect("clicked(bool)", self.onShowCache)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateModelStatus)
        self.ui.generatorComboBox.connect("currentIndexChanged(int)", self.updateGeneratorDescription)
        self.ui.referenceSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                      self.ui.referenceSegmentsTable.setSegmentationNode)
        self.initializeParameterNode()
        self.updateModelStatus()
        self.updateGeneratorDescription()
        self.updateCacheStatus()

    def _fillChoices(self):
        self.ui.generatorComboBox.addItem("auto")
        self._generatorDescriptions["auto"] = "the generator measured best with the chosen model"
        try:  # descriptions from the engine's registry (numpy + SimpleITK only); names alone if it cannot load
            from proxyprompt.generators import list_generators

            for generator in list_generators():
                self.ui.generatorComboBox.addItem(generator.name)
                self._generatorDescriptions[generator.name] = generator.description
        except Exception as error:  # e.g. numpy / SimpleITK missing before "Install dependencies"
            logging.info(f"ProxyPrompt: generator list unavailable until dependencies are installed ({error})")
            for name in KNOWN_GENERATORS:
                self.ui.generatorComboBox.addItem(name)
        self.ui.modelComboBox.addItem("auto")
        for row in self._modelRows():
            self.ui.modelComboBox.addItem(row["name"])
        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device)
        for axis in SLICE_AXES:
            self.ui.sliceAxisComboBox.addItem(axis)

    @staticmethod
    def _modelRows():
        from proxyprompt.models.registry import list_models

        return list_models()

    def cleanup(self):
        self.removeObservers()
        self.pollTimer.stop()
        self.downloadTimer.stop()
        if self._download is not None:
            self._download["cancel"].set()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        if self.logic is not None and self.logic.isRunning():
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.referenceVolume:
            self._parameterNode.referenceVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.referenceSegmentation:
            self._parameterNode.referenceSegmentation = slicer.mrmlScene.GetFirstNodeByClass(
                "vtkMRMLSegmentationNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        if self.logic is not None and self.logic.isRunning():
            return  # the button is the Cancel button while a run is going
        node = self._parameterNode
        ready = bool(node and node.referenceVolume and node.referenceSegmentation and node.targetVolume)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = "Segment the target" if ready else \
            "Select the reference volume, its segmentation and the target volume"

    # --- run / cancel ------------------------------------------------------------------------------------------
    def onApplyButton(self):
        if self.logic.isRunning():
            self.logic.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            self.ui.applyButton.enabled = False
            return
        node = self._parameterNode
        selected = list(self.ui.referenceSegmentsTable.selectedSegmentIDs())
        options = {"slice_axis": SLICE_AXES.get(node.sliceAxis), "image_size": node.imageSize or None}
        if node.extraReferenceVolume and node.extraReferenceSegmentation:
            options["extraReferences"] = [(node.extraReferenceVolume, node.extraReferenceSegmentation)]
        try:
            self.logic.process(node.referenceVolume, node.referenceSegmentation, node.targetVolume,
                               outputSegmentation=node.outputSegmentation, segmentIds=selected or None,
                               generator=node.generator, model=node.model, device=node.device, options=options,
                               waitForCompletion=False, progressCallback=self.onProgress)
        except ProxyPromptError as error:
            self._showError(str(error))
            return
        self.ui.applyButton.text = "Cancel"
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        self.ui.statusLabel.text = "Starting..."
        self.pollTimer.start()

    def onProgress(self, event):
        self.ui.progressBar.value = int(100 * event.fraction)
        self.ui.statusLabel.text = f"{event.phase}: {event.done}/{event.total} {event.message}".strip()

    def onPollTimer(self):
        if not self.logic.poll():
            return
        self.pollTimer.stop()
        self.ui.applyButton.text = "Segment"
        self.ui.progressBar.visible = False
        try:
            output = self.logic.takeResult()
        except ProxyPromptCancelled as error:
            self.ui.statusLabel.text = str(error)
        except ProxyPromptError as error:
            self._showError(str(error))
        else:
            self._parameterNode.outputSegmentation = output
            summary = self.logic.lastSummary or {}
            note = " (RANDOM weights: a pipeline test, not a segmentation)" if summary.get("random_weights") else ""
            corrected = summary.get("corrected_slices") or []
            kept = f", {len(corrected)} corrected slice(s) kept" if corrected else ""
            self.ui.statusLabel.text = (f"Done: {summary.get('generator')} with model {summary.get('model')} on "
                                        f"{summary.get('device')}{kept}, {summary.get('seconds', {}).get('total', 0):.1f} s"
                                        f"{note}")
            slicer.util.setSliceViewerLayers(background=self._parameterNode.targetVolume, fit=True)
        self._checkCanApply()

    def _showError(self, message):
        self.ui.statusLabel.text = f"Not done: {message}"
        slicer.util.errorDisplay(f"ProxyPrompt: {message}")

    # --- generator and model descriptions --------------------------------------------------------------------
    def updateGeneratorDescription(self, index=None):
        self.ui.generatorDescriptionLabel.text = self._generatorDescriptions.get(
            self.ui.generatorComboBox.currentText, "")

    def updateModelStatus(self, index=None):
        name = self.ui.modelComboBox.currentText
        rows = {row["name"]: row for row in self._modelRows()}
        row = rows.get(name)
        if row is None:  # auto
            self.ui.modelStatusLabel.text = "the best model available here (cached SAM 2, else LiteMedSAM, else none)"
            self.ui.downloadButton.enabled = False
            return
        size = f"{row['size_bytes'] / 1e6:.0f} MB" if row.get("size_bytes") else "no file"
        state = "cached" if row.get("cached") else "not downloaded"
        self.ui.modelStatusLabel.text = f"{row.get('description', '')} [{size}, {state}]"
        self.ui.downloadButton.enabled = not row.get("cached") and self._download is None

    # --- weights: download with progress and cancel, cache show / clear --------------------------------------
    def onDownloadButton(self):
        if self._download is not None:
            self._download["cancel"].set()
            self.ui.downloadButton.text = "Cancelling..."
            return
        state = {"cancel": threading.Event(), "done": 0, "total": None, "error": None, "path": None,
                 "model": self.ui.modelComboBox.currentText}

        def fetch():
            from proxyprompt.models.download import download_model

            def progress(done, total):
                state["done"], state["total"] = done, total

            try:
                state["path"] = download_model(state["model"], progress=progress, cancel=state["cancel"])
            except Exception as error:  # shown in the status line by onDownloadTimer
                state["error"] = error

        state["thread"] = threading.Thread(target=fetch, daemon=True)
        self._download = state
        self.ui.downloadButton.text = "Cancel download"
        self.ui.downloadProgressBar.value = 0
        self.ui.downloadProgressBar.visible = True
        state["thread"].start()
        self.downloadTimer.start()

    def onDownloadTimer(self):
        state = self._download
        if state is None:
            self.downloadTimer.stop()
            return
        if state["total"]:
            self.ui.downloadProgressBar.value = int(100 * state["done"] / state["total"])
        if state["thread"].is_alive():
            return
        self.downloadTimer.stop()
        self._download = None
        self.ui.downloadButton.text = "Download"
        self.ui.downloadProgressBar.visible = False
        if state["error"] is not None:
            self.ui.statusLabel.text = f"Download of {state['model']} stopped: {state['error']}"
        else:
            self.ui.statusLabel.text = f"{state['model']} is ready: {state['path']}"
        self.updateModelStatus()
        self.updateCacheStatus()

    def _cacheFolder(self):
        from proxyprompt.models.registry import cache_dir

        return cache_dir()

    def updateCacheStatus(self):
        folder = self._cacheFolder()
        files = [p for p in folder.glob("*") if p.is_file()] if folder.is_dir() else []
        size = sum(p.stat().st_size for p in files)
        self.ui.cacheStatusLabel.text = f"{folder} ({len(files)} file(s), {size / 1e6:.0f} MB)"

    def onShowCache(self):
        folder = self._cacheFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onClearCache(self):
        from proxyprompt.models.feature_cache import clear_feature_cache, feature_cache_dir

        folder = self._cacheFolder()
        if not folder.is_dir() and not feature_cache_dir().is_dir():
            return
        if not slicer.util.confirmOkCancelDisplay(f"Delete every downloaded model weight in {folder} and the cached "
                                                  f"reference features in {feature_cache_dir()}?"):
            return
        self.logic.shutdown()  # the worker may hold a model file open
        shutil.rmtree(folder, ignore_errors=True)
        clear_feature_cache()  # the same clear as `proxyprompt clear-cache`
        self.updateCacheStatus()
        self.updateModelStatus()

    # --- dependencies: on explicit click only ----------------------------------------------------------------
    def onInstallDependencies(self):
        requirements = self.logic.missingRequirements()
        torchMissing = importlib.util.find_spec("torch") is None
        if not requirements and not torchMissing:
            self.ui.dependenciesStatusLabel.text = "all installed"
            return
        listing = "\n".join((["PyTorch (through the PyTorch extension)"] if torchMissing else []) + requirements)
        if not slicer.util.confirmOkCancelDisplay(f"ProxyPrompt will install:\n\n{listing}\n\nContinue?"):
            return
        with slicer.util.tryWithErrorDisplay("Installing ProxyPrompt's dependencies failed.", waitCursor=True):
            if torchMissing:
                try:
                    import PyTorchUtils
                except ImportError:
                    raise RuntimeError("install the PyTorch extension from the Extension Manager first") from None
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    raise RuntimeError("PyTorch was not installed")
            self.logic.installRequirements(requirements)
            self.ui.dependenciesStatusLabel.text = "installed"


#
# Logic: the Qt-free engine Logic plus Slicer's parameter node
#
class ProxyPromptLogic(ScriptedLoadableModuleLogic, EngineLogic):
    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        EngineLogic.__init__(self)

    def getParameterNode(self):
        return ProxyPromptParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsFile():
        """The module's copy (installed extension) or the repository's Resources/requirements.txt."""
        for path in (os.path.join(MODULE_FOLDER, "Resources", "requirements.txt"),
                     os.path.join(os.path.dirname(MODULE_FOLDER), "Resources", "requirements.txt")):
            if os.path.isfile(path):
                return path
        raise FileNotFoundError("requirements.txt of ProxyPrompt not found")

    def missingRequirements(self):
        """Lines of requirements.txt whose distribution is not installed (version pins are left to pip)."""
        missing = []
        with open(self.requirementsFile()) as lines:
            for line in lines:
                requirement = line.split("#", 1)[0].strip()
                if not requirement:
                    continue
                name = requirement.split(";")[0]
                for separator in ("==", ">=", "<=", "~=", ">", "<", "["):
                    name = name.split(separator)[0]
                try:
                    importlib.metadata.version(name.strip())
                except importlib.metadata.PackageNotFoundError:
                    missing.append(requirement)
        return missing

    def installRequirements(self, requirements):
        if not requirements:
            return
        try:  # Slicer 5.11+: dependency management that checks before installing
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(packaging.load_requirements(self.requirementsFile()), requester="ProxyPrompt")
        else:
            slicer.util.pip_install(" ".join(f'"{requirement}"' for requirement in requirements))


#
# Self-test for real Slicer
#
class ProxyPromptTest(ScriptedLoadableModuleTest):
    model = None  # None: SAM 2.1 tiny when its weights are cached, else the real architecture with random weights

    def modelChoice(self):
        if self.model:
            return self.model
        from proxyprompt.models.registry import list_models

        cached = {row["name"] for row in list_models() if row.get("cached")}
        return "sam2.1_hiera_tiny" if "sam2.1_hiera_tiny" in cached else "random"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentCorrectAndRerun()

    def _volume(self, array, ijkToRAS, name):
        return slicer.util.addVolumeFromArray(array, ijkToRAS, name)

    def test_SegmentCorrectAndRerun(self):
        self.delayDisplay("Generated reference and oblique target")
        k, j, i = np.mgrid[0:12, 0:64, 0:64]
        reference = (200.0 * (((j - 30) ** 2 + (i - 34) ** 2) < 12 ** 2) + 20 * np.sin(i / 5.0)).astype(np.int16)
        target = (200.0 * (((j - 33) ** 2 + (i - 30) ** 2) < 11 ** 2) + 20 * np.sin(i / 5.0)).astype(np.int16)
        straight = np.diag([1.2, 1.2, 4.0, 1.0])
        angle = np.radians(20.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        oblique = np.eye(4)
        oblique[:3, :3] = rotation @ np.diag([1.1, 1.3, 4.0])
        oblique[:3, 3] = [10.0, -5.0, 3.0]
        referenceVolume = self._volume(reference, straight, "reference")
        targetVolume = self._volume(target, oblique, "target")
        referenceSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference labels")
        referenceSegmentation.CreateDefaultDisplayNodes()
        referenceSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segmentId = referenceSegmentation.GetSegmentation().AddEmptySegment("disc", "disc", [0.9, 0.6, 0.1])
        slicer.util.updateSegmentBinaryLabelmapFromArray((reference > 100).astype(np.uint8), referenceSegmentation,
                                                         segmentId, referenceVolume)

        model = self.modelChoice()
        self.delayDisplay(f"Segment with the model '{model}'")
        logic = ProxyPromptLogic()
        try:
            output = logic.process(referenceVolume, referenceSegmentation, targetVolume, model=model,
                                   options={"image_size": 512})
            segment = output.GetSegmentation().GetNthSegment(0)
            self.assertEqual(segment.GetName(), "disc")
            self.assertEqual(tuple(round(c, 3) for c in segment.GetColor()), (0.9, 0.6, 0.1))
            labels = slicer.util.arrayFromSegmentBinaryLabelmap(output, output.GetSegmentation().GetNthSegmentID(0),
                                                                targetVolume)
            self.assertEqual(labels.shape, target.shape)

            self.delayDisplay("Correct two slices and re-run")
            corrected = labels.copy()  # two slices drawn by hand: the left half of the disc, then the right half
            corrected[4] = (target[4] > 100) & (i[4] < 32)
            corrected[7] = (target[7] > 100) & (i[7] >= 32)
            slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, output,
                                                             output.GetSegmentation().GetNthSegmentID(0), targetVolume)
            again = logic.process(referenceVolume, referenceSegmentation, targetVolume, outputSegmentation=output,
                                  model=model, options={"image_size": 512})
            self.assertIs(again, output)
            self.assertEqual(logic.lastSummary["corrected_slices"], [4, 7])
            result = slicer.util.arrayFromSegmentBinaryLabelmap(output, output.GetSegmentation().GetNthSegmentID(0),
                                                                targetVolume)
            for index in (4, 7):
                np.testing.assert_array_equal(result[index], corrected[index])
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")
