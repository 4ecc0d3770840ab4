"""Training a generator's own weights from files (`proxyprompt train`): the policy, shared by every front end.

    summary = train(TrainRequest(generator="proxy-prompt", images=[...], labels=[...], model="litemedsam",
                                 output="ppg.pt", log="loss.jsonl"), progress=callback, cancel=token)

Reads and checks the training cases, builds the model (frozen), continues from `resume` (a checkpoint of the same
generator for the same model), writes one JSON line per step to `log`, trains with bf16 autocast on CUDA (fp32
elsewhere) and writes the checkpoint atomically with its metadata (`generators.checkpoints`). Which generator trains
is a registry name: a generator that has no weights of its own is refused with a clear message.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .errors import InputError
from .options import EngineOptions, TrainingOptions
from .progress import ProgressCallback, check_cancel, report

log = logging.getLogger("proxyprompt")


@dataclass
class TrainRequest:
    """One training job by file paths. `TrainingOptions` fields (max_masks, steps, seed) and the model fields of
    `EngineOptions` (device, precision, image_size) are fields of their own."""

    generator: str
    images: List[str]
    labels: List[str]
    model: str = "auto"
    output: Optional[str] = None  # default: where `find_generator_checkpoint` looks
    checkpoint: Optional[str] = None  # the model's checkpoint file
    label_table: Optional[str] = None
    log: Optional[str] = None  # JSON-lines loss log
    resume: Optional[str] = None  # a checkpoint to continue from
    generator_options: Dict[str, object] = field(default_factory=dict)
    max_masks: int = TrainingOptions.max_masks
    steps: Optional[int] = TrainingOptions.steps
    seed: int = TrainingOptions.seed
    device: str = EngineOptions.device
    precision: str = EngineOptions.precision
    image_size: Optional[int] = EngineOptions.image_size

    def training_options(self) -> TrainingOptions:
        return TrainingOptions(**{name: getattr(self, name) for name in TrainingOptions.names()})


def training_precision(device: str, requested: str) -> str:
    """Autocast of the training passes: bf16 on CUDA unless fp32 was asked for; fp32 elsewhere unless bf16 was."""
    if requested == "bf16" or (requested == "auto" and device == "cuda"):
        return "bf16"
    return "fp32"


def train(request: TrainRequest, progress: Optional[ProgressCallback] = None, cancel=None) -> dict:
    from .atomic import refuse_overwriting_inputs
    from .cases import load_reference_case
    from .generators.base import get_generator
    from .generators.checkpoints import TrainingJob, load_generator_checkpoint, train_generator
    from .models.loader import load_model
    from .service import resolve_model_choice

    started = time.perf_counter()
    generator = get_generator(request.generator)
    if not generator.needs_training:
        raise InputError(f"generator '{generator.name}' has no trained weights: it cannot be trained (trainable: "
                         f"{', '.join(trainable_generators()) or 'none'})")
    if len(request.images) != len(request.labels) or not request.images:
        raise InputError(f"{len(request.images)} training image(s) but {len(request.labels)} label(s): give one "
                         "--label per --image, at least one pair")
    options = generator.Options.parse(request.generator_options, f"generator '{generator.name}'")
    training_options = request.training_options()
    outputs = [p for p in (request.output, request.log) if p]
    for output in outputs:
        refuse_overwriting_inputs(Path(output), [*request.images, *request.labels, request.label_table,
                                                 request.resume])
    report(progress, "read", 0, len(request.images))
    cases = []
    for index, (image, label) in enumerate(zip(request.images, request.labels)):
        cases.append(load_reference_case(image, label, request.label_table))
        report(progress, "read", index + 1, len(request.images))
    model_name, _ = resolve_model_choice(request.model, generator.name)
    model = load_model(model_name, checkpoint=request.checkpoint, device=request.device,
                       image_size=request.image_size, precision=request.precision)
    if model is None:
        raise InputError(f"training generator '{generator.name}' needs a model (its weights read the model's "
                         "features), not 'none'")
    resume = None
    if request.resume:
        _, resume = load_generator_checkpoint(request.resume, generator.name, model)  # refuses another model
    check_cancel(cancel)
    precision = training_precision(model.device, request.precision)
    log_handle = None
    if request.log:
        Path(request.log).parent.mkdir(parents=True, exist_ok=True)
        log_handle = open(request.log, "a" if request.resume else "w", encoding="utf-8")
    last: Dict[str, object] = {}

    def write_log(record: dict) -> None:
        last.update(record)
        if log_handle is not None:
            log_handle.write(json.dumps(record) + "\n")
            log_handle.flush()

    try:
        job = TrainingJob(options=training_options, resume=resume, log=write_log, precision=precision)
        path = train_generator(generator.name, cases, model, [*request.images, *request.labels], options=options,
                               output=request.output, progress=progress, cancel=cancel, job=job)
    finally:
        if log_handle is not None:
            log_handle.close()
    meta, _ = load_generator_checkpoint(path, generator.name, model)
    return {"output": str(path), "generator": generator.name, "model": model.name, "image_size": model.image_size,
            "device": model.device, "precision": precision, "random_weights": bool(model.is_random),
            "num_masks": meta.num_masks, "labels": {str(k): v for k, v in meta.label_names.items()},
            "steps": last.get("step"), "final_loss": last.get("loss"),
            "seconds": round(time.perf_counter() - started, 3)}


def trainable_generators() -> List[str]:
    from .generators import list_generators

    return [generator.name for generator in list_generators() if generator.needs_training]
