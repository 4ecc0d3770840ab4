"""What a prompt generator hands to a model: the `PromptPlan`, and the registry of generators.

A generator turns (reference case(s), target frames, model) into a PromptPlan. The model then executes
the plan over the target's frames (`SliceModel.propagate`). Generators never touch model internals, and
models never look at the reference case except through the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..errors import InputError
from ..frames import SliceStack
from ..volume import LabelTable, Volume


@dataclass(frozen=True, eq=False)
class ReferenceCase:
    """An annotated case: image, label map on the image's grid, label table."""

    image: Volume
    label: Volume
    table: LabelTable


@dataclass(eq=False)
class ObjectPrompt:
    """Prompts for one structure (one label value) on the target's frames (frame = slice index)."""

    label: int
    masks: Dict[int, np.ndarray] = field(default_factory=dict)  # frame -> bool [H, W]: conditioning masks
    boxes: Dict[int, np.ndarray] = field(default_factory=dict)  # frame -> [x0, y0, x1, y1] pixels
    points: Dict[int, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # frame -> ([P, 2] xy, [P] 1/0)
    prior: Optional[np.ndarray] = None  # [N, H, W] float32 in [0, 1]: soft prior over all frames
    frame_range: Optional[Tuple[int, int]] = None  # first..last frame (inclusive) where it is expected


@dataclass(eq=False)
class SupportSlice:
    """A reference slice used as in-context memory (support-memory generator)."""

    image: np.ndarray  # [H, W] float32 in [0, 1], windowed like the target, on the target's in-plane grid
    masks: Dict[int, np.ndarray]  # label -> bool [H, W]
    relative_position: float  # position within the reference structure's slice extent, 0..1
    source_index: int  # slice index in the reference stack


@dataclass(eq=False)
class PromptPlan:
    objects: Dict[int, ObjectPrompt]
    support: List[SupportSlice] = field(default_factory=list)
    support_top_k: int = 4
    start_frame: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    # label value -> per-structure quality estimate ({"score": ..., evidence...}; proxyprompt.quality), if known
    quality: Dict[int, dict] = field(default_factory=dict)

    @property
    def labels(self) -> List[int]:
        return sorted(self.objects)


@dataclass(eq=False)
class Corrections:
    """User-corrected slices: their voxels are copied to the output unchanged and guide the rest."""

    labels: np.ndarray  # [N, H, W] integer label stack on the target frames
    frames: List[int]  # the corrected frame indices

    def __post_init__(self) -> None:
        self.frames = sorted({int(f) for f in self.frames})
        for frame in self.frames:
            if not 0 <= frame < self.labels.shape[0]:
                raise InputError(f"corrected slice {frame} is outside the target's {self.labels.shape[0]} slices")


@dataclass(eq=False)
class GeneratorContext:
    references: List[ReferenceCase]
    target_image: Volume
    target_frames: SliceStack
    labels: List[int]  # label values to segment
    model: object  # a SliceModel, or None for model "none"
    options: dict = field(default_factory=dict)
    progress: Optional[Callable[[str, int, int], None]] = None
    cancel: Optional[object] = None


class Generator:
    """Base class: subclasses set `name`, `description`, `needs_training` and implement `plan`."""

    name = ""
    description = ""
    needs_training = False

    def plan(self, context: GeneratorContext) -> PromptPlan:  # pragma: no cover - interface
        raise NotImplementedError


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
