"""The engine's policy and its file-level job, shared by every front end (CLI, `proxyprompt serve`, Slicer).

    session = EngineSession()
    summary = session.segment(SegmentRequest(reference_images=[...], reference_labels=[...], target=..., output=...),
                              progress=callback, cancel=token)

A front end builds a `SegmentRequest` and shows the summary; the choice of model and generator, the option
defaults, reading, validation and the atomic write all live here, so the CLI and the Slicer module behave alike.
An `EngineSession` keeps the built model (and its cached target features) across requests: a re-run on the same
target re-encodes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import InputError
from .options import EngineOptions, default_generator
from .progress import ProgressCallback, check_cancel, report
from .quality import LOW_QUALITY_PREFIX

log = logging.getLogger("proxyprompt")


@dataclass
class SegmentRequest:
    """One segmentation job, by file paths (what the CLI parses and what the Slicer module's worker receives).

    The engine's options are fields of their own (`ENGINE_FIELDS`, the fields of `EngineOptions`); the generator's
    options go in `generator_options` (names of the generator's `Options` dataclass; unknown names are an error)."""

    reference_images: List[str]
    reference_labels: List[str]
    target: str
    output: str
    label_table: Optional[str] = None
    generator: Optional[str] = None  # None / "auto": the engine's default for the model
    model: str = "auto"
    checkpoint: Optional[str] = None
    labels: Optional[List[int]] = None
    slice_axis: Optional[int] = None
    corrections: Optional[str] = None
    corrected_slices: Optional[List[int]] = None
    cleanup: bool = True
    # sparse references: the annotated slices (along the reference's acquisition axis) of every reference; the others
    # are unknown, not background (None: the slices that hold any label)
    annotated_slices: Optional[List[int]] = None
    generator_options: Dict[str, object] = field(default_factory=dict)
    # EngineOptions' fields (their defaults are EngineOptions' own)
    device: str = EngineOptions.device
    image_size: Optional[int] = EngineOptions.image_size
    precision: str = EngineOptions.precision
    fusion: str = EngineOptions.fusion
    fusion_top_k: Optional[int] = EngineOptions.fusion_top_k
    refinement_rounds: int = EngineOptions.refinement_rounds

    ENGINE_FIELDS = EngineOptions.names()

    def engine_options(self) -> EngineOptions:
        return EngineOptions(**{name: getattr(self, name) for name in self.ENGINE_FIELDS})

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentRequest":
        if not isinstance(data, dict):
            raise InputError("a segment request must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown request field(s): {', '.join(unknown)}")
        for name in ("reference_images", "reference_labels", "target", "output"):
            if name not in data:
                raise InputError(f"segment request lacks '{name}'")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


# --- policy -------------------------------------------------------------------------------------
def default_generator_for(model: str) -> str:
    """The generator measured best with a model (`options.default_generator`, by the model's family)."""
    from .models.registry import get_model_spec

    return default_generator(get_model_spec(model).family)


def resolve_model_choice(model: Optional[str], generator: Optional[str]) -> Tuple[str, str]:
    """'auto' -> the best model available here, and the generator measured best with it."""
    from .models.loader import best_available_model

    if model in (None, "", "auto"):
        model, reason = best_available_model()
        log.info("model: %s (%s)", model, reason)
    if generator in (None, "", "auto"):
        generator = default_generator_for(model)
    return model, generator


# --- the job ------------------------------------------------------------------------------------
# Written into every output made with random weights (NIfTI descrip holds 80 characters).
RANDOM_WEIGHTS_NOTE = "ProxyPrompt: RANDOM model weights, a pipeline test, not a segmentation"


class EngineSession:
    """Keeps one built Engine (model + cached target features) across requests."""

    def __init__(self) -> None:
        self._engine = None
        self._engine_key: Optional[tuple] = None

    def engine_for(self, model: str, checkpoint=None, options: Optional[EngineOptions] = None):
        """The kept Engine when model, checkpoint and the model's options match, else a new one."""
        from .pipeline import Engine

        options = options or EngineOptions()
        key = (model, checkpoint) + tuple(getattr(options, name) for name in EngineOptions.MODEL_FIELDS)
        if self._engine is None or self._engine_key != key:
            self._engine = None  # free the old model before building the next
            self._engine = Engine(model, checkpoint=checkpoint, options=options)
            self._engine_key = key
        return self._engine

    def segment(self, request: SegmentRequest, progress: Optional[ProgressCallback] = None, cancel=None) -> dict:
        """Read the files, run the engine, write the output atomically; returns the summary the CLI prints."""
        from .atomic import refuse_overwriting_inputs
        from .cases import load_reference_case
        from .integrity import check_intensities
        from .pipeline import MAX_TARGET_VOXELS
        from .volume import check_output_path, read_image, read_label, write_label

        started = time.perf_counter()
        if len(request.reference_images) != len(request.reference_labels):
            raise InputError(
                f"{len(request.reference_images)} reference image(s) but {len(request.reference_labels)} reference "
                "label(s): give one label per reference image"
            )
        if not request.reference_images:
            raise InputError("at least one reference case is needed")
        output = check_output_path(request.output)
        refuse_overwriting_inputs(output, [*request.reference_images, *request.reference_labels, request.target,
                                           request.corrections, request.label_table])
        report(progress, "read", 0, len(request.reference_images) + 1)
        references = []
        for index, (image, label) in enumerate(zip(request.reference_images, request.reference_labels)):
            references.append(load_reference_case(image, label, request.label_table, request.annotated_slices))
            report(progress, "read", index + 1, len(request.reference_images) + 1)
        target = read_image(request.target, max_voxels=MAX_TARGET_VOXELS)
        check_intensities(target.array, f"target {request.target}", request.target)
        report(progress, "read", len(request.reference_images) + 1, len(request.reference_images) + 1)
        corrections = None
        if request.corrections:
            corrections, _ = read_label(request.corrections)
        model, generator = resolve_model_choice(request.model, request.generator)
        engine_options = request.engine_options()
        read_seconds = time.perf_counter() - started
        check_cancel(cancel)

        tick = time.perf_counter()
        engine = self.engine_for(model, request.checkpoint, engine_options)
        build_seconds = time.perf_counter() - tick  # model build and weight load (0 when the session kept it)
        if engine.model is not None and engine.model.is_random:
            log.warning("model '%s' has RANDOM weights: the output tests the pipeline, it is not a segmentation",
                        model)
        result = engine.segment(
            references, target, generator=generator, labels=request.labels, slice_axis=request.slice_axis,
            corrections=corrections, corrected_slices=request.corrected_slices, cleanup=request.cleanup,
            options=dict(request.generator_options or {}), engine_options=engine_options,
            progress=progress, cancel=cancel,
        )
        check_cancel(cancel)
        tick = time.perf_counter()
        report(progress, "write", 0, 1)
        write_label(result.label, result.table, output,
                    note=RANDOM_WEIGHTS_NOTE if result.info["random_weights"] else "")
        report(progress, "write", 1, 1)
        seconds: Dict[str, float] = dict(result.timings)
        seconds["read"] = read_seconds
        seconds["build"] = build_seconds
        seconds["write"] = time.perf_counter() - tick
        seconds["total"] = time.perf_counter() - started
        summary = {
            "output": str(output),
            "generator": result.info["generator"],
            "model": result.info["model"],
            "device": result.info["device"],
            "precision": result.info["precision"],
            "random_weights": result.info["random_weights"],
            "slices": result.info["slices"],
            "slice_axis": result.info["slice_axis"],
            "labels": {str(v): info.name for v, info in result.table.items()},
            "corrected_slices": result.info["corrected_slices"],
            "references": len(references),
            "notes": result.info["notes"],
            "options": result.info["options"],
            "refinement_rounds": result.info["refinement_rounds"],
            # label value (JSON key: text) -> {"score", evidence...}; a warning is in the notes when a score is low
            "quality": {str(v): q for v, q in result.info.get("quality", {}).items()},
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        if "encoder_calls" in result.info:
            summary["encoder_calls"] = result.info["encoder_calls"]
            summary["encoded_slices"] = result.info["encoded_slices"]  # of the target's `slices`
        for note in result.info["notes"]:  # what the generator did (which slices it matched, how well): the user checks
            (log.warning if note.startswith(LOW_QUALITY_PREFIX) else log.info)("%s", note)
        return summary
