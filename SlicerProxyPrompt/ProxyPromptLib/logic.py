"""ProxyPrompt's Logic: MRML nodes <-> temporary files, the engine worker, the user's corrections. No Qt.

    from ProxyPromptLib.logic import ProxyPromptLogic
    logic = ProxyPromptLogic()
    seg = logic.process(referenceVolume, referenceSegmentation, targetVolume)   # -> vtkMRMLSegmentationNode
    logic.cancel()

It uses only what Slicer's core offers (MRML nodes, module logics, `slicer.util`, storage nodes), so it runs unchanged
in Slicer and on the `slicer-core` wheel. The model math runs in a separate `proxyprompt serve` process that keeps
the model and the target's image features, so a re-run after corrections re-encodes nothing and Slicer never freezes.
Reference labels are exported in the reference volume's geometry; the result is imported with the target volume as
reference geometry. Inputs are never modified; a failed or cancelled run leaves the scene as it was.
"""

import os
import shutil
import tempfile
import time

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from .worker import EngineWorker, WorkerError

CANCEL_GRACE_SECONDS = 10.0  # after a cancel request the worker gets this long to stop, then it is killed
# Request fields the Logic fills itself; every other option goes to the worker, whose SegmentRequest validates it.
LOGIC_FIELDS = ("reference_images", "reference_labels", "target", "output", "corrections", "corrected_slices",
                "label_table", "generator", "model", "device")


class ProxyPromptError(RuntimeError):
    """A run did not happen or did not finish; the message is one line, and the scene is as it was."""


class ProxyPromptCancelled(ProxyPromptError):
    """The user cancelled the run; the scene is as it was."""


def _matrix(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _nodeName(node):
    return node.GetName() if node is not None else "(none)"


def _writeVolumeFile(volumeNode, path):
    """Write a volume node through a storage node that is not added to the scene (the node itself is not touched)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(0)
    if not storage.WriteData(volumeNode):
        raise ProxyPromptError(f"cannot write {_nodeName(volumeNode)} to {path}")


def _writeLabelFile(labelArray, geometryVolume, path):
    """Write a [k, j, i] label array with a volume's IJKToRAS as NRRD."""
    labelNode = slicer.vtkMRMLLabelMapVolumeNode()
    matrix = vtk.vtkMatrix4x4()
    geometryVolume.GetIJKToRASMatrix(matrix)
    labelNode.SetIJKToRASMatrix(matrix)
    image = vtk.vtkImageData()
    labelNode.SetAndObserveImageData(image)
    slicer.util.updateVolumeFromArray(labelNode, np.ascontiguousarray(labelArray))
    _writeVolumeFile(labelNode, path)


def _readLabelFile(path):
    """Read a label map NRRD into a node outside the scene; returns ([k, j, i] array, IJKToRAS)."""
    labelNode = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    if not storage.ReadData(labelNode):
        raise ProxyPromptError(f"cannot read the engine's result {path}")
    return np.array(slicer.util.arrayFromVolume(labelNode)), _matrix(labelNode)


def _geometryImage(volumeNode):
    """An empty oriented image with a volume's grid (IJKToRAS and extent): the geometry segments are resampled to."""
    geometry = slicer.vtkOrientedImageData()
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    geometry.SetImageToWorldMatrix(matrix)
    geometry.SetExtent(volumeNode.GetImageData().GetExtent())
    return geometry


def _segmentMask(segmentationNode, segmentId, geometry, shape):
    """One segment as a [k, j, i] 0/1 array on `geometry`'s grid (nearest neighbour; nothing is added to the scene)."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = slicer.vtkOrientedImageData()
    logic.GetSegmentBinaryLabelmapRepresentation(segmentationNode, segmentId, image, False)
    extent = image.GetExtent()
    if image.GetPointData().GetScalars() is None or extent[0] > extent[1] or extent[2] > extent[3] \
            or extent[4] > extent[5]:
        return np.zeros(shape, np.uint8)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, geometry, resampled, False, True):
        raise ProxyPromptError(f"cannot resample segment '{segmentId}' of '{segmentationNode.GetName()}'")
    if tuple(resampled.GetExtent()) != tuple(geometry.GetExtent()):
        raise ProxyPromptError(f"segment '{segmentId}' of '{segmentationNode.GetName()}' did not resample to the grid")
    voxels = vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape)
    # segments may share one labelmap layer, each with its own label value
    labelValue = segmentationNode.GetSegmentation().GetSegment(segmentId).GetLabelValue()
    return (voxels == labelValue).astype(np.uint8)


def _segmentLabels(segmentationNode, segmentIds, geometryVolume):
    """Segments as one [k, j, i] label array on a volume's grid: value n+1 = segmentIds[n] (later ones win)."""
    dims = geometryVolume.GetImageData().GetDimensions()
    shape = (dims[2], dims[1], dims[0])
    geometry = _geometryImage(geometryVolume)
    labels = np.zeros(shape, dtype=np.uint8 if len(segmentIds) < 255 else np.uint16)
    for index, segmentId in enumerate(segmentIds):
        if segmentId is None:
            continue
        labels[_segmentMask(segmentationNode, segmentId, geometry, shape) > 0] = index + 1
    return labels


def _setSegmentMask(segmentationNode, segmentId, mask, geometryVolume):
    """Replace a segment's voxels with a [k, j, i] 0/1 array on a volume's grid (no temporary node)."""
    image = _geometryImage(geometryVolume)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE, image.GetExtent()):
        raise ProxyPromptError(f"cannot write segment '{segmentId}' of '{segmentationNode.GetName()}'")


def _segmentIdsByName(segmentationNode, names):
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetSegmentIdBySegmentName(name) or None for name in names]


class _Job:
    """One run: its inputs, temporary folder and outcome."""

    def __init__(self, requestId, inputs, progressCallback):
        self.requestId = requestId
        self.inputs = inputs
        self.progressCallback = progressCallback
        self.folder = tempfile.mkdtemp(prefix="ProxyPrompt-")
        self.outputPath = os.path.join(self.folder, "result.nrrd")
        self.cancelRequestedAt = None
        self.done = False
        self.error = None
        self.cancelled = False
        self.result = None
        self.summary = None

    def removeFiles(self):
        shutil.rmtree(self.folder, ignore_errors=True)


class ProxyPromptLogic:
    """Runs ProxyPrompt on MRML nodes. One run at a time; `process`, `poll`, `cancel`, `takeResult`."""

    def __init__(self, python=None):
        self.python = python  # None: PythonSlicer in Slicer, else the running interpreter
        self.worker = None
        self.segmentEditorLogic = None  # optional vtkSlicerSegmentEditorLogic that receives the undo state
        self.lastSummary = None
        self._job = None
        self._requestCount = 0
        self._written = {}  # output node ID -> what this Logic wrote last (to find the user's corrected slices)

    # --- public ---------------------------------------------------------------------------------------------
    def process(self, referenceVolume, referenceSegmentation, targetVolume, outputSegmentation=None, segmentIds=None,
                generator="auto", model="auto", device="auto", options=None, waitForCompletion=True,
                progressCallback=None):
        """Segment `targetVolume` from the reference; returns the output segmentation node.

        With waitForCompletion=False it returns None at once; call `poll()` until it returns True, then
        `takeResult()`. options: slice_axis, image_size, precision, checkpoint, registration_method, fusion, top_k,
        cleanup, and extraReferences = [(volumeNode, segmentationNode), ...] (segments matched by name).
        Raises ProxyPromptError (one-line reason) and leaves the scene unchanged when the run cannot be done.
        """
        if self.isRunning():
            raise ProxyPromptError("a run is in progress: wait for it or cancel it first")
        options = dict(options or {})
        extraReferences = list(options.pop("extraReferences", None) or [])
        reserved = sorted(set(options) & set(LOGIC_FIELDS))
        if reserved:
            raise ProxyPromptError(f"option(s) set by the Logic itself: {', '.join(reserved)}")
        options = {key: value for key, value in options.items() if value is not None}
        segmentIds = self._validate(referenceVolume, referenceSegmentation, targetVolume, outputSegmentation,
                                    segmentIds, extraReferences)
        self._requestCount += 1
        inputs = {"referenceVolume": referenceVolume, "referenceSegmentation": referenceSegmentation,
                  "targetVolume": targetVolume, "outputSegmentation": outputSegmentation, "segmentIds": segmentIds}
        job = _Job(f"run-{self._requestCount}", inputs, progressCallback)
        try:
            request = dict(options, generator=generator, model=model, device=device)
            request.update(self._writeInputs(job, extraReferences, options.get("slice_axis")))
            self._ensureWorker()
            self.worker.send({"type": "segment", "id": job.requestId, "request": request})
        except WorkerError as error:
            job.removeFiles()
            self.worker = None
            raise ProxyPromptError(str(error)) from None
        except BaseException:
            job.removeFiles()
            raise
        self._job = job
        if not waitForCompletion:
            return None
        try:
            while not self.poll(timeout=0.2):
                pass
        except BaseException:  # e.g. Ctrl+C in the console, or a progress callback that raised: stop the run
            job.progressCallback = None
            self.cancel()
            while not self.poll(timeout=0.2):
                pass
            self._job = None
            raise
        return self.takeResult()

    def isRunning(self):
        return self._job is not None and not self._job.done

    def cancel(self):
        """Ask the worker to stop the run; it is killed when it has not stopped after CANCEL_GRACE_SECONDS."""
        job = self._job
        if job is None or job.done or job.cancelRequestedAt is not None:
            return
        job.cancelRequestedAt = time.monotonic()
        try:
            self.worker.send({"type": "cancel", "id": job.requestId})
        except WorkerError:
            pass  # already gone: poll() reports it as cancelled

    def poll(self, timeout=0.0):
        """Handle the worker's events; True when the run is over (then call `takeResult`)."""
        job = self._job
        if job is None:
            return True
        if job.done:
            return True
        callbackError = None  # raised after the whole batch is handled, so no event (a result) is lost
        for event in self.worker.events(timeout=timeout):
            if event is None or job.done:
                break
            if event.get("id") != job.requestId:
                continue
            kind = event.get("type")
            if kind == "progress":
                try:
                    self._reportProgress(job, event.get("event") or {})
                except BaseException as error:
                    callbackError = callbackError or error
            elif kind == "result":
                self._finish(job, summary=event.get("summary") or {})
            elif kind == "cancelled":
                self._finish(job, cancelled=True)
            elif kind == "error":
                self._finish(job, error=str(event.get("reason") or "the engine failed"))
        if not job.done and job.cancelRequestedAt is not None and \
                time.monotonic() - job.cancelRequestedAt > CANCEL_GRACE_SECONDS:
            self.worker.kill()
            self.worker = None
            self._finish(job, cancelled=True)
        if not job.done and not self.worker.isAlive() and not self.worker.events():
            message = self.worker.deathMessage()
            self.worker = None  # restarted on the next run
            if job.cancelRequestedAt is not None:
                self._finish(job, cancelled=True)
            else:
                self._finish(job, error=message)
        if callbackError is not None:
            raise callbackError
        return job.done

    def takeResult(self):
        """The finished run's output node; raises ProxyPromptError / ProxyPromptCancelled when it did not succeed."""
        job = self._job
        if job is None or not job.done:
            raise ProxyPromptError("no finished run")
        self._job = None
        if job.cancelled:
            raise ProxyPromptCancelled("cancelled by the user; nothing was changed")
        if job.error is not None:
            raise ProxyPromptError(job.error)
        return job.result

    def shutdown(self):
        """Stop the worker (the module calls this when Slicer closes)."""
        if self.isRunning():
            self.cancel()
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None
        if self._job is not None:
            self._job.removeFiles()
            self._job = None

    # --- validation (before anything is written or changed) -------------------------------------------------
    def _validate(self, referenceVolume, referenceSegmentation, targetVolume, outputSegmentation, segmentIds,
                  extraReferences):
        for role, node in (("reference volume", referenceVolume), ("target volume", targetVolume)):
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.GetImageData() is None:
                raise ProxyPromptError(f"the {role} must be a scalar volume with image data")
        if referenceSegmentation is None or not referenceSegmentation.IsA("vtkMRMLSegmentationNode"):
            raise ProxyPromptError("the reference segmentation must be a segmentation node")
        if outputSegmentation is not None and not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
            raise ProxyPromptError("the output must be a segmentation node")
        if targetVolume is referenceVolume:
            raise ProxyPromptError("the target volume is the reference volume: choose another target")
        if outputSegmentation is not None and outputSegmentation is referenceSegmentation:
            raise ProxyPromptError("the output segmentation is the reference segmentation: choose another output")
        nodes = [referenceVolume, referenceSegmentation, targetVolume, outputSegmentation]
        for volume, segmentation in extraReferences:
            nodes += [volume, segmentation]
        for node in nodes:
            if node is not None and node.GetParentTransformNode() is not None:
                raise ProxyPromptError(
                    f"'{node.GetName()}' is under the transform '{node.GetParentTransformNode().GetName()}': "
                    "harden or remove the transform first")
        dims = targetVolume.GetImageData().GetDimensions()
        if min(dims) < 2:
            raise ProxyPromptError(f"the target volume is 2D ({dims[0]} x {dims[1]} x {dims[2]} voxels): "
                                   "a 3D volume is needed")
        segmentation = referenceSegmentation.GetSegmentation()
        available = list(segmentation.GetSegmentIDs())
        if not available:
            raise ProxyPromptError(f"the reference segmentation '{referenceSegmentation.GetName()}' has no segments")
        if segmentIds is None:
            segmentIds = available
        segmentIds = list(segmentIds)
        if not segmentIds:
            raise ProxyPromptError("no segment selected")
        missing = [segmentId for segmentId in segmentIds if segmentId not in available]
        if missing:
            raise ProxyPromptError(f"segment '{missing[0]}' does not exist in '{referenceSegmentation.GetName()}'")
        return segmentIds

    # --- files ----------------------------------------------------------------------------------------------
    def _writeInputs(self, job, extraReferences, sliceAxis):
        inputs = job.inputs
        reference = inputs["referenceSegmentation"]
        segmentIds = inputs["segmentIds"]
        names = [reference.GetSegmentation().GetSegment(segmentId).GetName() for segmentId in segmentIds]
        references = [(inputs["referenceVolume"], reference, segmentIds)]
        for volume, segmentation in extraReferences:
            ids = _segmentIdsByName(segmentation, names)
            if None in ids:
                raise ProxyPromptError(
                    f"'{segmentation.GetName()}' has no segment named '{names[ids.index(None)]}'")
            references.append((volume, segmentation, ids))
        request = {"reference_images": [], "reference_labels": [], "output": job.outputPath}
        for index, (volume, segmentation, ids) in enumerate(references):
            labels = _segmentLabels(segmentation, ids, volume)
            if not labels.any():
                raise ProxyPromptError(f"the reference segmentation '{segmentation.GetName()}' is empty "
                                       f"on the grid of '{volume.GetName()}'")
            imagePath = os.path.join(job.folder, f"reference{index}.nrrd")
            labelPath = os.path.join(job.folder, f"reference{index}_label.nrrd")
            _writeVolumeFile(volume, imagePath)
            _writeLabelFile(labels, volume, labelPath)
            request["reference_images"].append(imagePath)
            request["reference_labels"].append(labelPath)
        request["target"] = os.path.join(job.folder, "target.nrrd")
        _writeVolumeFile(inputs["targetVolume"], request["target"])
        corrections = self._corrections(inputs["outputSegmentation"], inputs["targetVolume"], names, sliceAxis)
        if corrections is not None:
            labels, slices, axis = corrections
            request["corrections"] = os.path.join(job.folder, "corrections.nrrd")
            _writeLabelFile(labels, inputs["targetVolume"], request["corrections"])
            request["corrected_slices"] = slices
            request["slice_axis"] = axis
        job.names = names
        return request

    def _corrections(self, outputSegmentation, targetVolume, names, sliceAxis=None):
        """The slices where the output node differs from what this Logic wrote last on this target, or None.

        Slices are counted along `sliceAxis` when one is asked for, else along the axis of the last run."""
        if outputSegmentation is None:
            return None
        written = self._written.get(outputSegmentation.GetID())
        if written is None or written["target"] != targetVolume.GetID() or written["names"] != names:
            return None
        current = _segmentLabels(outputSegmentation, _segmentIdsByName(outputSegmentation, names), targetVolume)
        if current.shape != written["labels"].shape:
            return None
        axis = written["axis"] if sliceAxis is None else int(sliceAxis)
        differs = np.moveaxis(current != written["labels"], axis, 0)
        slices = [int(n) for n in np.flatnonzero(differs.reshape(differs.shape[0], -1).any(axis=1))]
        if not slices:
            return None
        return current, slices, axis

    # --- worker ---------------------------------------------------------------------------------------------
    def _ensureWorker(self):
        if self.worker is not None and self.worker.isAlive():
            return
        self.worker = EngineWorker(self.python)
        self.worker.start()
        self.worker.waitUntilReady()

    def _reportProgress(self, job, eventDict):
        if job.progressCallback is None:
            return
        from proxyprompt.progress import ProgressEvent  # the engine's one event type (no torch, no Qt)

        job.progressCallback(ProgressEvent.from_dict(eventDict))

    def _finish(self, job, summary=None, cancelled=False, error=None):
        try:
            if summary is not None and not cancelled and error is None:
                try:
                    job.result = self._importResult(job)
                    job.summary = self.lastSummary = summary
                except ProxyPromptError as importError:
                    error = str(importError)
                except Exception as importError:  # the scene was restored by _importResult
                    error = f"{type(importError).__name__}: {importError}"
            job.cancelled = cancelled
            job.error = error
        finally:
            job.done = True
            job.removeFiles()
        if job.summary is not None:
            try:
                self._remember(job)
            except Exception:  # without it a later re-run finds no corrected slices; the result itself stands
                self._written.pop(job.result.GetID(), None)

    # --- result into the scene ------------------------------------------------------------------------------
    def _importResult(self, job):
        inputs = job.inputs
        target = inputs["targetVolume"]
        labels, matrix = _readLabelFile(job.outputPath)
        dims = target.GetImageData().GetDimensions()
        if labels.shape != (dims[2], dims[1], dims[0]) or not np.allclose(matrix, _matrix(target), atol=1e-4):
            raise ProxyPromptError("the engine's result is not on the target's grid")
        reference = inputs["referenceSegmentation"].GetSegmentation()
        sources = [reference.GetSegment(segmentId) for segmentId in inputs["segmentIds"]]
        output = inputs["outputSegmentation"]
        scene = target.GetScene()
        created = output is None
        backup = None
        if created:
            output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                             scene.GenerateUniqueName(f"{target.GetName()} ProxyPrompt"))
            output.CreateDefaultDisplayNodes()
        else:
            self._saveStateForUndo(output)
            backup = slicer.vtkSegmentation()
            backup.DeepCopy(output.GetSegmentation())
        try:
            output.SetReferenceImageGeometryParameterFromVolumeNode(target)
            segmentation = output.GetSegmentation()
            for value, source in enumerate(sources, start=1):
                segmentId = segmentation.GetSegmentIdBySegmentName(source.GetName())
                if not segmentId:
                    segmentId = segmentation.AddEmptySegment("", source.GetName(), source.GetColor())
                segment = segmentation.GetSegment(segmentId)
                segment.SetColor(source.GetColor())
                terminology = source.GetTerminology()
                if terminology:
                    segment.SetTerminology(terminology)
                _setSegmentMask(output, segmentId, labels == value, target)
        except BaseException:
            if created:
                scene.RemoveNode(output)
            else:
                output.GetSegmentation().DeepCopy(backup)
            raise
        return output

    def _saveStateForUndo(self, segmentationNode):
        """An undo state before an existing output is changed: in the Segment Editor's history when one is given."""
        editor = self.segmentEditorLogic
        if editor is not None and editor.GetSegmentationNode() is segmentationNode:
            editor.SaveStateForUndo()
        scene = segmentationNode.GetScene()
        if scene is not None:
            scene.SaveStateForUndo()

    def _remember(self, job):
        """What the output node holds now, on the target grid, to find the slices the user corrects later."""
        output, target = job.result, job.inputs["targetVolume"]
        labels = _segmentLabels(output, _segmentIdsByName(output, job.names), target)
        self._written[output.GetID()] = {"target": target.GetID(), "names": list(job.names), "labels": labels,
                                         "axis": int(job.summary.get("slice_axis", 0))}
