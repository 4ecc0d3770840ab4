"""What a prompt generator hands to a model: the `PromptPlan`, and the registry of generators.

A generator turns (reference case(s), target frames, model) into a PromptPlan. The engine checks the plan against
the model's capabilities and the model executes it over the target's frames (`SliceModel.propagate`); a generator may
then refine the plan from the model's output (`Generator.refine`, up to `EngineOptions.refinement_rounds`).
Generators never touch model internals (they read `model.capabilities` and the public feature calls), and models
never look at the reference case except through the plan. docs/engine-contract.md is the author's guide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from ..contract import (  # noqa: F401  (the contract's types, re-exported for generator authors)
    Corrections,
    ObjectPrompt,
    PromptEmbedding,
    PromptPlan,
    ReferenceCase,
    SupportSlice,
)
from ..errors import InputError
from ..frames import SliceStack
from ..options import EngineOptions, NoOptions
from ..progress import ProgressCallback
from ..volume import Volume


@dataclass(eq=False)
class GeneratorContext:
    references: List[ReferenceCase]
    target_image: Volume
    target_frames: SliceStack
    labels: List[int]  # label values to segment
    model: object  # a SliceModel, or None for model "none"
    options: object = None  # the generator's Options (a dict is parsed by `Generator.options_of`)
    progress: Optional[ProgressCallback] = None
    cancel: Optional[object] = None
    engine_options: EngineOptions = field(default_factory=EngineOptions)  # fusion_top_k already resolved
    refinement_round: int = 0  # 0 while planning; n in the n-th call of `refine`


class Generator:
    """Base class: subclasses set `name`, `description`, `Options` (their options dataclass), `needs_model`,
    `needs_training`, and implement `plan` (and optionally `refine`)."""

    name = ""
    description = ""
    needs_training = False
    needs_model = False  # True: refused with model 'none' before any work (its plans give no mask prior)
    Options = NoOptions

    def options_of(self, context: GeneratorContext):
        """The context's options as this generator's Options (a dict is validated; unknown names refused)."""
        return self.Options.parse(context.options, f"generator '{self.name}'")

    def plan(self, context: GeneratorContext) -> PromptPlan:  # pragma: no cover - interface
        raise NotImplementedError

    def train(self, references: List[ReferenceCase], model, options, progress=None, cancel=None, job=None):
        """Trainable generators (`needs_training = True`): fit their own weights on the references with the
        model's features and return `checkpoints.TrainedWeights`; `checkpoints.train_generator` writes the file.
        `job` (`checkpoints.TrainingJob`): training options (max masks, steps, seed), resume tensors, step log,
        precision."""
        raise InputError(f"generator '{self.name}' has no trained weights: it cannot be trained")

    def refine(self, plan: PromptPlan, probabilities: Dict[int, np.ndarray],
               context: GeneratorContext) -> Optional[PromptPlan]:
        """After the model ran `plan` (probabilities: label -> [N, H, W] float32): a new plan for another round, or
        None to stop. The model's cached features are reused (no re-encoding). Default: no refinement."""
        return None


_GENERATORS: Dict[str, Callable[[], Generator]] = {}


def register_generator(cls):
    _GENERATORS[cls.name] = cls
    return cls


def get_generator(name: str) -> Generator:
    from . import load_builtin_generators

    load_builtin_generators()
    if name not in _GENERATORS:
        raise InputError(f"unknown generator '{name}'; known: {', '.join(sorted(_GENERATORS))}")
    return _GENERATORS[name]()


def list_generators() -> List[Generator]:
    from . import load_builtin_generators

    load_builtin_generators()
    return [factory() for _, factory in sorted(_GENERATORS.items())]
