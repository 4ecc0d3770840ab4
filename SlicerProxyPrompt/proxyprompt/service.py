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
from .progress import ProgressCallback, check_cancel, report
from .quality import LOW_QUALITY_PREFIX

log = logging.getLogger("proxyprompt")


@dataclass
class SegmentRequest:
    """One segmentation job, by file paths (what the CLI parses and what the Slicer module's worker receives)."""

    reference_images: List[str]
    reference_labels: List[str]
    target: str
    output: str
    label_table: Optional[str] = None
    generator: Optional[str] = None  # None / "auto": the engine's default for the model
    model: str = "auto"
    checkpoint: Optional[str] = None
    device: str = "auto"
    image_size: Optional[int] = None
    precision: str = "auto"
    labels: Optional[List[int]] = None
    slice_axis: Optional[int] = None
    corrections: Optional[str] = None
    corrected_slices: Optional[List[int]] = None
    registration_method: Optional[str] = None
    fusion: str = "vote"
    top_k: Optional[int] = None
    cleanup: bool = True
    annotated_slices: Optional[List[int]] = None  # sparse references: the annotated slices (others unknown)

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
    """The generator measured best with a model (docs/benchmarks.md)."""
    from .models.registry import get_model_spec

    # With a model, support-memory (reference slices as memory / aligned prompts; the registration prior when no
    # slice aligns): ACDC, LiteMedSAM, 80 cross-patient pairs, on par with the registration prior as prompts (mean
    # Dice 0.539 vs 0.530; 0.484 vs 0.501 on the 40 pairs that chose no setting, docs/benchmarks.md), and the form
    # SAM 2's memory takes. Without a model, registration is the only generator that gives a segmentation.
    return "registration" if get_model_spec(model).family == "none" else "support-memory"


def resolve_model_choice(model: Optional[str], generator: Optional[str]) -> Tuple[str, str]:
    """'auto' -> the best model available here, and the generator measured best with it."""
    from .models.base import best_available_model

    if model in (None, "", "auto"):
        model, reason = best_available_model()
        log.info("model: %s (%s)", model, reason)
    if generator in (None, "", "auto"):
        generator = default_generator_for(model)
    return model, generator


def default_fusion_top_k(top_k: Optional[int], references: int) -> Optional[int]:
    """Fuse the 3 references whose warped labels agree best when more than 3 are given (docs/benchmarks.md:
    ACDC ED, best 3 of 19 references 0.788 vs 0.615 for one)."""
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"--top-k must be at least 1, got {top_k}")
        return top_k
    return 3 if references > 3 else None


# --- the job ------------------------------------------------------------------------------------
class EngineSession:
    """Keeps one built Engine (model + cached target features) across requests."""

    def __init__(self) -> None:
        self._engine = None
        self._engine_key: Optional[tuple] = None

    def engine_for(self, model: str, checkpoint=None, device="auto", image_size=None, precision="auto"):
        from .pipeline import Engine

        key = (model, checkpoint, device, image_size, precision)
        if self._engine is None or self._engine_key != key:
            self._engine = None  # free the old model before building the next
            self._engine = Engine(model, checkpoint=checkpoint, device=device, image_size=image_size,
                                  precision=precision)
            self._engine_key = key
        return self._engine

    def segment(self, request: SegmentRequest, progress: Optional[ProgressCallback] = None, cancel=None) -> dict:
        """Read the files, run the engine, write the output atomically; returns the summary the CLI prints."""
        from .cases import load_reference_case
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
        report(progress, "read", 0, len(request.reference_images) + 1)
        references = []
        for index, (image, label) in enumerate(zip(request.reference_images, request.reference_labels)):
            references.append(load_reference_case(image, label, request.label_table))
            report(progress, "read", index + 1, len(request.reference_images) + 1)
        target = read_image(request.target, max_voxels=MAX_TARGET_VOXELS)
        report(progress, "read", len(request.reference_images) + 1, len(request.reference_images) + 1)
        corrections = None
        if request.corrections:
            corrections, _ = read_label(request.corrections)
        model, generator = resolve_model_choice(request.model, request.generator)
        read_seconds = time.perf_counter() - started
        check_cancel(cancel)

        engine = self.engine_for(model, request.checkpoint, request.device, request.image_size, request.precision)
        if engine.model is not None and engine.model.is_random:
            log.warning("model '%s' has RANDOM weights: the output tests the pipeline, it is not a segmentation",
                        model)
        result = engine.segment(
            references, target, generator=generator, labels=request.labels, slice_axis=request.slice_axis,
            corrections=corrections, corrected_slices=request.corrected_slices, cleanup=request.cleanup,
            options={"registration_method": request.registration_method, "fusion": request.fusion,
                     "top_k": default_fusion_top_k(request.top_k, len(references)),
                     "annotated_slices": request.annotated_slices},
            progress=progress, cancel=cancel,
        )
        check_cancel(cancel)
        tick = time.perf_counter()
        report(progress, "write", 0, 1)
        write_label(result.label, result.table, output)
        report(progress, "write", 1, 1)
        seconds: Dict[str, float] = dict(result.timings)
        seconds["read"] = read_seconds
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
            # label value (JSON key: text) -> {"score", evidence...}; a warning is in the notes when a score is low
            "quality": {str(v): q for v, q in result.info.get("quality", {}).items()},
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        if "encoder_calls" in result.info:
            summary["encoder_calls"] = result.info["encoder_calls"]
        for note in result.info["notes"]:  # what the generator did (which slices it matched, how well): the user checks
            (log.warning if note.startswith(LOW_QUALITY_PREFIX) else log.info)("%s", note)
        return summary
