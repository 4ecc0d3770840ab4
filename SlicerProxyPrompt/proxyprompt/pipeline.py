"""The engine's one entry point: reference case(s) + target image -> label volume on the target grid.

    engine = Engine(model="litemedsam")
    result = engine.segment([reference], target_image, generator="registration", progress=..., cancel=...)
    result.label            # Volume on the target's exact grid
    engine.segment(..., corrections=Corrections(...))   # re-run: cached image features are reused

Flow (data moves one way): frames -> generator -> PromptPlan -> checked against the model's capabilities ->
executed (`generators.propagation.execute_plan`: the model's own memory propagation, or slice by slice) -> probabilities (-> generator.refine -> another plan, up to `EngineOptions.refinement_rounds`) ->
label map (threshold, overlap by highest probability, per-structure cleanup) -> corrected slices copied
in unchanged -> back to the target grid.

Options: `options` are the generator's (its `Options` dataclass, or a dict of its fields: unknown names are an
error); `engine_options` (`EngineOptions`) hold the fusion of several references and the refinement limit (the
model's device / precision / image size are fixed when the Engine is built).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .contract import Corrections, PromptPlan, ReferenceCase, check_plan
from .errors import InputError
from .options import EngineOptions, default_fusion_top_k, default_generator
from .progress import ProgressCallback, check_cancel
from .frames import SliceStack, make_slice_stack
from .generators.base import GeneratorContext, get_generator
from .generators.propagation import execute_plan
from .volume import LabelTable, Volume

log = logging.getLogger("proxyprompt")


# Largest target the engine accepts: frames are held as float32 plus model features per slice.
MAX_TARGET_VOXELS = 512 * 512 * 1024


class CancelToken:
    """Set from another thread (or the Slicer UI) to stop a run; the engine checks it between slices."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        check_cancel(self)


@dataclass(eq=False)
class SegmentationResult:
    label: Volume  # on the target's exact grid
    table: LabelTable
    probabilities: Optional[Dict[int, Volume]]
    timings: Dict[str, float]
    info: Dict[str, object] = field(default_factory=dict)


def validate_reference(reference: ReferenceCase, index: int = 0) -> None:
    if not reference.label.same_grid(reference.image):
        raise InputError(
            f"reference label {index + 1} is not on its image's grid: label {reference.label.describe_grid()}, "
            f"image {reference.image.describe_grid()}"
        )
    if not np.any(reference.label.array):
        raise InputError(f"reference label {index + 1} is empty: nothing to segment")


def validate_target(target_image: Volume) -> None:
    voxels = int(np.prod(target_image.array.shape))
    if voxels > MAX_TARGET_VOXELS:
        raise InputError(
            f"target has {voxels:,} voxels, more than the {MAX_TARGET_VOXELS:,} this engine holds in memory; "
            "crop it to the region of interest first"
        )


def choose_labels(references: Sequence[ReferenceCase], labels: Optional[Sequence[int]]) -> List[int]:
    present = set()
    for reference in references:
        present |= {int(v) for v in np.unique(reference.label.array) if v != 0}
    if labels is None:
        return sorted(present)
    missing = sorted(set(int(v) for v in labels) - present)
    if missing:
        raise InputError(
            f"--labels names {', '.join(map(str, missing))}, which the reference lacks "
            f"(it has {', '.join(map(str, sorted(present)))})"
        )
    return sorted(set(int(v) for v in labels))


def compose_labels(probabilities: Dict[int, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """Per voxel: the label with the highest probability among those above the threshold, else 0."""
    labels = sorted(probabilities)
    if not labels:
        raise ValueError("no probabilities to compose")
    stacked = np.stack([probabilities[v] for v in labels])  # [L, N, H, W]
    best = np.argmax(stacked, axis=0)
    above = np.take_along_axis(stacked, best[None], axis=0)[0] > threshold
    values = np.asarray(labels, dtype=np.uint16)[best]
    return np.where(above, values, 0).astype(np.uint16)


def keep_largest_components(label_stack: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Per label, keep its largest 3D connected component (voxel connectivity does not depend on spacing)."""
    from .registration import keep_largest_component

    unit_grid = Volume.from_geometry(label_stack, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    return np.array(keep_largest_component(unit_grid, labels).array)


class Engine:
    """Holds one model (and its cached image features) across runs, as the Slicer module's process does."""

    def __init__(self, model: str = "none", checkpoint: Optional[str] = None, device: str = "auto",
                 image_size: Optional[int] = None, precision: str = "auto",
                 options: Optional[EngineOptions] = None) -> None:
        """`options` (EngineOptions) replaces device / image_size / precision when given; its fusion and
        refinement fields are the defaults of every run."""
        from .models.loader import load_model
        from .models.registry import get_model_spec

        if options is None:
            options = EngineOptions(device=device, image_size=image_size, precision=precision)
        self.options = EngineOptions.parse(options, "the engine")
        self.model_spec = get_model_spec(model)
        self.model = load_model(model, checkpoint=checkpoint, device=self.options.device,
                                image_size=self.options.image_size, precision=self.options.precision)
        self.device = self.model.device if self.model is not None else "cpu"
        self._frames_cache: Dict[tuple, SliceStack] = {}

    @property
    def model_name(self) -> str:
        return self.model_spec.name

    def default_generator(self) -> str:
        return default_generator(self.model_spec.family if self.model is not None else "none")

    def _frames(self, target_image: Volume, axis: Optional[int]) -> SliceStack:
        key = (id(target_image), axis)
        if key not in self._frames_cache:
            self._frames_cache.clear()
            self._frames_cache[key] = make_slice_stack(target_image, axis)
        return self._frames_cache[key]

    def segment(
        self,
        references: Sequence[ReferenceCase],
        target_image: Volume,
        generator: Optional[str] = None,
        labels: Optional[Sequence[int]] = None,
        slice_axis: Optional[int] = None,
        corrections: Optional[Volume] = None,
        corrected_slices: Optional[Sequence[int]] = None,
        cleanup: bool = True,
        return_probabilities: bool = False,
        options=None,
        progress: Optional[ProgressCallback] = None,
        cancel=None,
        engine_options: Optional[EngineOptions] = None,
    ) -> SegmentationResult:
        started = time.perf_counter()
        timings: Dict[str, float] = {}
        if not references:
            raise InputError("at least one reference case is needed")
        for index, reference in enumerate(references):
            validate_reference(reference, index)
        validate_target(target_image)
        label_values = choose_labels(references, labels)
        generator_name = generator or self.default_generator()
        plugin = get_generator(generator_name)
        generator_options = plugin.Options.parse(options, f"generator '{plugin.name}'")
        run_options = self._run_options(engine_options, len(references))
        if plugin.needs_model and self.model is None:
            raise InputError(f"generator '{plugin.name}' gives no mask prior, so it needs a model (not 'none')")

        tick = time.perf_counter()
        frames = self._frames(target_image, slice_axis)
        correction_plan = self._corrections(corrections, corrected_slices, frames)
        timings["frames"] = time.perf_counter() - tick
        check_cancel(cancel)

        # No up-front encoding: the model encodes what the generator and the propagation ask for (a SAM-family
        # model only the slices that can hold a structure); "encode" is its encoder time within the phases below
        encoded_before = self._encode_seconds()
        reference_before = self._encode_seconds("reference_encode_seconds")

        tick = time.perf_counter()
        context = GeneratorContext(
            references=list(references), target_image=target_image, target_frames=frames, labels=label_values,
            model=self.model, options=generator_options, progress=progress, cancel=cancel,
            engine_options=run_options,
        )
        plan = plugin.plan(context)
        encoded_in_plan = self._encode_seconds() - encoded_before
        timings["prompts"] = time.perf_counter() - tick - encoded_in_plan
        check_cancel(cancel)

        tick = time.perf_counter()
        plan, probabilities = self._execute(plan, plugin.name, label_values, frames, correction_plan, progress,
                                            cancel)
        # the reference's slices (SAM 2 support memory; 0 when read from the feature cache) apart from the target's
        timings["encode_reference"] = self._encode_seconds("reference_encode_seconds") - reference_before
        timings["encode"] = self._encode_seconds() - encoded_before - timings["encode_reference"]
        timings["propagate"] = time.perf_counter() - tick - (self._encode_seconds() - encoded_before - encoded_in_plan)
        check_cancel(cancel)

        # refinement rounds: the generator reads the output and may give a new plan (features stay cached)
        rounds = 0
        notes = list(plan.notes)
        refine_started = time.perf_counter()
        while rounds < run_options.refinement_rounds:
            context.refinement_round = rounds + 1
            refined = plugin.refine(plan, probabilities, context)
            if refined is None:
                break
            check_cancel(cancel)
            plan, probabilities = self._execute(refined, plugin.name, label_values, frames, correction_plan,
                                                progress, cancel)
            notes += [note for note in plan.notes if note not in notes]
            rounds += 1
        if rounds:
            timings["refine"] = time.perf_counter() - refine_started

        tick = time.perf_counter()
        label_stack = compose_labels(probabilities)
        if cleanup:
            label_stack = keep_largest_components(label_stack, label_values)
        if correction_plan is not None:
            for frame in correction_plan.frames:  # copied unchanged, less the labels not asked for (--labels)
                corrected = correction_plan.labels[frame]
                label_stack[frame] = np.where(np.isin(corrected, label_values), corrected, 0)
        label_volume = frames.to_volume(label_stack)
        probability_volumes = None
        if return_probabilities:
            probability_volumes = {v: frames.to_volume(p.astype(np.float32)) for v, p in probabilities.items()}
        timings["write_back"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started

        table = {}
        for reference in references:
            for value, info in reference.table.items():
                table.setdefault(value, info)
        table = {v: table[v] for v in label_values if v in table}
        info = {
            "generator": plugin.name,
            "model": self.model_name,
            "device": self.device,
            "precision": self.model.precision if self.model is not None else "fp32",
            "random_weights": bool(self.model is not None and self.model.is_random),
            "slices": frames.num_slices,
            "slice_axis": frames.axis,
            "labels": label_values,
            "corrected_slices": correction_plan.frames if correction_plan else [],
            "notes": notes,
            "refinement_rounds": rounds,
            "options": generator_options.to_dict(),
            "quality": dict(plan.quality),
        }
        if self.model is not None:
            info["encoder_calls"] = self.model.encoder_calls
            info["encoded_slices"] = self.model.encoded_slices(frames)  # a SAM-family model: those that can hold a label
        return SegmentationResult(label_volume, table, probability_volumes, timings, info)

    def _encode_seconds(self, counter: str = "encode_seconds") -> float:
        return float(getattr(self.model, counter, 0.0)) if self.model is not None else 0.0

    def _run_options(self, engine_options: Optional[EngineOptions], references: int) -> EngineOptions:
        """This run's engine options: the model's fields must be the Engine's; fusion top-k gets its default."""
        from dataclasses import replace

        options = self.options if engine_options is None else EngineOptions.parse(engine_options, "the engine")
        for name in EngineOptions.MODEL_FIELDS:
            if getattr(options, name) != getattr(self.options, name):
                raise InputError(f"engine option {name} is {getattr(self.options, name)!r} for this engine (set when "
                                 f"it was built), not {getattr(options, name)!r}: build another Engine")
        return replace(options, fusion_top_k=default_fusion_top_k(options.fusion_top_k, references))

    def _execute(self, plan: PromptPlan, generator_name: str, label_values, frames: SliceStack,
                 correction_plan: Optional[Corrections], progress, cancel):
        """(plan as executed, label -> [N, H, W] probabilities): the model runs the plan once it is checked against
        its capabilities; without a model the plan's priors are the result."""
        if self.model is None:
            missing = [v for v in label_values if plan.objects.get(v) is None or plan.objects[v].prior is None]
            if missing:
                raise InputError(f"generator '{generator_name}' gives no mask prior, so it needs a model (not 'none')")
            return plan, {v: plan.objects[v].prior for v in label_values}
        plan = check_plan(plan, self.model.capabilities, self.model_name, generator_name)
        return plan, execute_plan(self.model, frames, plan, correction_plan, progress=progress, cancel=cancel)

    @staticmethod
    def _corrections(corrections: Optional[Volume], corrected_slices, frames: SliceStack) -> Optional[Corrections]:
        if corrections is None:
            if corrected_slices:
                raise InputError("--corrected-slices needs --corrections")
            return None
        if not corrections.same_grid(frames.volume):
            raise InputError(
                f"corrections must be on the target's grid: corrections {corrections.describe_grid()}, "
                f"target {frames.volume.describe_grid()}"
            )
        stack = frames.labels(corrections)
        if corrected_slices is None:
            corrected_slices = [int(n) for n in np.flatnonzero(stack.reshape(stack.shape[0], -1).any(axis=1))]
            if not corrected_slices:
                raise InputError("the corrections labelmap is empty: no corrected slice")
        return Corrections(np.ascontiguousarray(stack), list(corrected_slices))


def segment(references: Sequence[ReferenceCase], target_image: Volume, model: str = "none",
            checkpoint: Optional[str] = None, engine_options: Optional[EngineOptions] = None,
            **kwargs) -> SegmentationResult:
    """One-off run (builds an Engine). Keep an `Engine` to reuse the model and features across runs."""
    engine = Engine(model, checkpoint, options=engine_options)
    return engine.segment(references, target_image, engine_options=engine_options, **kwargs)
