"""The types generators and models exchange (the engine contract), in one module that imports no engine code.

A generator turns reference case(s) and the target's frames into a `PromptPlan`; the engine checks the plan against
the model's `ModelCapabilities` and the model executes it. Models offer their cached image features to generators as
`PixelFeatures` (per-pixel, [N, C, h, w], with the `FeatureGrid` that maps feature cells to frame pixels) and pooled
slice embeddings ([N, D]). docs/engine-contract.md describes the contract for a generator author.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import InputError
from .volume import LabelTable, Volume


@dataclass(frozen=True, eq=False)
class ReferenceCase:
    """An annotated case: image, label map on the image's grid, label table. `annotated_slices`: for a sparse
    reference, the slices (along its acquisition axis) that were annotated; the others are unknown, not background
    (None: the slices holding any label, `proxyprompt.sparse`)."""

    image: Volume
    label: Volume
    table: LabelTable
    annotated_slices: Optional[Tuple[int, ...]] = None


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


PROMPT_EMBEDDING_DIM = 256  # the prompt-token width of every SAM-family and SAM 2 mask decoder


@dataclass(eq=False)
class PromptEmbedding:
    """Prompt embeddings that a mask decoder takes in place of encoded points / boxes / mask input.

    sparse_tokens_t256: [T, 256] float32, what a prompt encoder makes of points and boxes (T >= 1);
    dense_256hw: optional [256, h, w] float32 on the model's feature grid (`ModelCapabilities.feature_grid`), what
    a prompt encoder makes of a mask input; None: the model's "no mask" embedding.
    """

    sparse_tokens_t256: np.ndarray
    dense_256hw: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        sparse = np.asarray(self.sparse_tokens_t256, dtype=np.float32)
        if sparse.ndim != 2 or sparse.shape[0] < 1 or sparse.shape[1] != PROMPT_EMBEDDING_DIM:
            raise InputError(f"sparse prompt tokens must be [T, {PROMPT_EMBEDDING_DIM}] with T >= 1, "
                             f"got {list(sparse.shape)}")
        self.sparse_tokens_t256 = sparse
        if self.dense_256hw is not None:
            dense = np.asarray(self.dense_256hw, dtype=np.float32)
            if dense.ndim != 3 or dense.shape[0] != PROMPT_EMBEDDING_DIM:
                raise InputError(f"a dense prompt embedding must be [{PROMPT_EMBEDDING_DIM}, h, w], "
                                 f"got {list(dense.shape)}")
            self.dense_256hw = dense


@dataclass(eq=False)
class ObjectPrompt:
    """Prompts for one structure (one label value) on the target's frames (frame = slice index)."""

    label: int
    masks: Dict[int, np.ndarray] = field(default_factory=dict)  # frame -> bool [H, W]: conditioning masks
    boxes: Dict[int, np.ndarray] = field(default_factory=dict)  # frame -> [x0, y0, x1, y1] pixels
    points: Dict[int, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # frame -> ([P, 2] xy, [P] 1/0)
    prior: Optional[np.ndarray] = None  # [N, H, W] float32 in [0, 1]: soft prior over all frames
    # first..last frame (inclusive) where it is expected; the propagation side (generators/propagation.py) bounds
    # the output to it for every model, so it needs no capability
    frame_range: Optional[Tuple[int, int]] = None
    embeddings: Dict[int, PromptEmbedding] = field(default_factory=dict)  # frame -> prompt embeddings


@dataclass(eq=False)
class SupportSlice:
    """A reference slice used as in-context memory (support-memory generator)."""

    image: np.ndarray  # [H, W] float32 in [0, 1], windowed like the target, on the target's in-plane grid
    masks: Dict[int, np.ndarray]  # label -> bool [H, W]
    relative_position: float  # position within the reference structure's slice extent, 0..1
    source_index: int  # slice index in the reference stack


@dataclass(frozen=True)
class PriorPolicy:
    """How a memory-less model is run from a prior (`generators.prior_refinement`). crop_margin: fraction of the
    prior's box size added on each side of the crop (None: no crop, the whole frame); min_agreement: per slice and
    structure, Dice between the model's mask and the prior below which the prior is kept (0: always the model);
    box_margin: model-input pixels around each prior box (the model sees the frame resized to its input, so a margin
    in frame pixels would grow with the upsampling of small frames); jitter_px / min_stability: per structure, the
    model is run a second time with each box `jitter_px` frame pixels wider, and where its two masks agree (3D Dice
    over the structure) below `min_stability` the whole structure keeps the prior (0: no check); mask_prompt: also
    feed the prior as the model's mask input."""

    crop_margin: Optional[float] = None
    min_agreement: float = 0.0
    box_margin: float = 5.0
    jitter_px: float = 2.0
    min_stability: float = 0.85
    mask_prompt: bool = False
    min_crop_px: int = 32

    def describe(self) -> str:
        crop = "whole frame" if self.crop_margin is None else f"crop around the prior (margin {self.crop_margin:g})"
        stability = (f", prior kept for a structure whose mask moves with a {self.jitter_px:g} px wider box (3D "
                     f"Dice below {self.min_stability:g})" if self.min_stability > 0 else "")
        choice = (f", prior kept on slices where the model agrees with it below Dice {self.min_agreement:g}"
                  if self.min_agreement > 0 else "")
        return (f"model stage from the prior: {crop}, box margin {self.box_margin:g} model-input px{stability}{choice}"
                + (", prior as mask input" if self.mask_prompt else ""))


@dataclass(eq=False)
class PromptPlan:
    """What a model executes. `optional_fields`: plan fields (names of `PLAN_FIELDS`) the generator can do without;
    a model that cannot execute one drops it with a note instead of refusing the plan.

    `support_attention`: target frame -> indices into `support` of the support slices that frame attends as
    conditioning memory (the frame also attends every conditioning frame of the target itself: prompts,
    corrections); None: every support slice. Generators choose it (`generators.propagation.top_k_support`)."""

    objects: Dict[int, ObjectPrompt]
    support: List[SupportSlice] = field(default_factory=list)
    support_attention: Optional[Dict[int, Tuple[int, ...]]] = None
    start_frame: Optional[int] = None
    notes: List[str] = field(default_factory=list)
    optional_fields: Tuple[str, ...] = ()
    # label value -> per-structure quality estimate ({"score": ..., evidence...}; proxyprompt.quality), if known
    quality: Dict[int, dict] = field(default_factory=dict)
    # how a memory-less model refines the objects' priors (crop, per-slice choice); None: plain box prompts
    prior_policy: Optional[PriorPolicy] = None
    # ring-shaped labels {ring: [labels it encloses]} as the generator knows them (from the reference's label, closed
    # by construction); None: the slice-by-slice strategy detects them on the priors / seeds
    rings: Optional[Dict[int, List[int]]] = None

    @property
    def labels(self) -> List[int]:
        return sorted(self.objects)


@dataclass(frozen=True)
class ModelCapabilities:
    """What a model executes of a plan, and what it offers generators.

    memory: propagates with memory through the frames (SAM 2's video predictor): executes `support` (reference slices
    as conditioning memory) and `start_frame`; support_attention: restricts each target frame's conditioning memory
    to the support slices the plan names; boxes / points / masks / prior / embeddings: executes those per-object
    plan fields; pixel_features: offers `pixel_features(frames)`;
    slice_embeddings: offers pooled embeddings of target frames and of arbitrary slices (`slice_embeddings`,
    `embed_slices`); feature_grid: (h, w) of its per-pixel features / dense prompt embeddings.
    """

    memory: bool = False
    support_attention: bool = False
    boxes: bool = False
    points: bool = False
    masks: bool = False
    prior: bool = False
    embeddings: bool = False
    pixel_features: bool = False
    slice_embeddings: bool = False
    feature_grid: Optional[Tuple[int, int]] = None


# plan field -> the capability that executes it
PLAN_FIELDS = {
    "support": "memory",
    "start_frame": "memory",
    "support_attention": "support_attention",
    "masks": "masks",
    "boxes": "boxes",
    "points": "points",
    "prior": "prior",
    "embeddings": "embeddings",
}


def used_plan_fields(plan: PromptPlan) -> List[str]:
    """The plan fields that carry something (names of `PLAN_FIELDS`)."""
    used = set()
    if plan.support:
        used.add("support")
    if plan.start_frame is not None:
        used.add("start_frame")
    if plan.support_attention is not None:
        used.add("support_attention")
    for prompt in plan.objects.values():
        for name in ("masks", "boxes", "points", "embeddings"):
            if getattr(prompt, name):
                used.add(name)
        if prompt.prior is not None:
            used.add("prior")
    return [name for name in PLAN_FIELDS if name in used]


def drop_plan_field(plan: PromptPlan, name: str) -> None:
    """Remove one plan field's content (in place)."""
    if name == "support":
        plan.support = []
    elif name == "start_frame":
        plan.start_frame = None
    elif name == "support_attention":
        plan.support_attention = None
    else:
        for prompt in plan.objects.values():
            empty = None if name == "prior" else {}
            setattr(prompt, name, empty)


def check_plan(plan: PromptPlan, capabilities: ModelCapabilities, model_name: str, generator_name: str) -> PromptPlan:
    """Refuse a plan field the model cannot execute (InputError naming field and model), or drop it with a note
    when the generator marked it optional. Returns the (possibly reduced) plan."""
    for name in plan.optional_fields:
        if name not in PLAN_FIELDS:
            raise InputError(f"generator '{generator_name}' marks unknown plan field '{name}' optional; "
                             f"known: {', '.join(PLAN_FIELDS)}")
    executes = [name for name, capability in PLAN_FIELDS.items() if getattr(capabilities, capability)]
    for name in used_plan_fields(plan):
        if getattr(capabilities, PLAN_FIELDS[name]):
            continue
        if name in plan.optional_fields:
            drop_plan_field(plan, name)
            plan.notes.append(f"plan field '{name}' dropped: model '{model_name}' does not execute it")
            continue
        raise InputError(
            f"plan field '{name}' of generator '{generator_name}' cannot be executed by model '{model_name}' "
            f"(it executes: {', '.join(executes) or 'nothing'})"
        )
    return plan


@dataclass(frozen=True)
class FeatureGrid:
    """Where a model's per-pixel feature cells lie on a frame.

    shape: (h, w) cells; cell_size: (rows, cols) of frame pixels per cell; valid: (h, w) cells that cover the frame
    (the rest is padding, e.g. LiteMedSAM's zero-padded bottom / right). Cell (i, j) is centred on frame pixel
    ((i + 0.5) * cell_rows - 0.5, (j + 0.5) * cell_cols - 0.5).
    """

    shape: Tuple[int, int]
    cell_size: Tuple[float, float]
    valid: Tuple[int, int]
    frame_shape: Tuple[int, int]

    def cell_centres(self) -> Tuple[np.ndarray, np.ndarray]:
        """(rows [h], cols [w]) frame-pixel coordinates of the cell centres."""
        rows = (np.arange(self.shape[0]) + 0.5) * self.cell_size[0] - 0.5
        cols = (np.arange(self.shape[1]) + 0.5) * self.cell_size[1] - 0.5
        return rows, cols

    def frame_to_cell(self, row: float, col: float) -> Tuple[int, int]:
        """The cell holding frame pixel (row, col)."""
        i = int(np.clip(np.floor((row + 0.5) / self.cell_size[0]), 0, self.shape[0] - 1))
        j = int(np.clip(np.floor((col + 0.5) / self.cell_size[1]), 0, self.shape[1] - 1))
        return i, j

    def refined(self, factor: int) -> "FeatureGrid":
        """The same extent in cells `factor` times smaller (e.g. the mask decoder's low-resolution logits, 4 x the
        feature grid)."""
        factor = int(factor)
        return FeatureGrid((self.shape[0] * factor, self.shape[1] * factor),
                           (self.cell_size[0] / factor, self.cell_size[1] / factor),
                           (self.valid[0] * factor, self.valid[1] * factor), self.frame_shape)

    def mask_to_grid(self, mask_hw: np.ndarray) -> np.ndarray:
        """[h, w] float32: the fraction of each cell covered by a frame mask [H, W] (0 on padding cells), by area:
        exact whether cells are larger than pixels (a 256 px slice on a 64 x 64 grid) or smaller (a 35 x 50 px
        hippocampus slice on the same grid, or the decoder's 4x finer grid), where assigning each pixel to the one
        cell holding its centre would leave most cells empty."""
        mask = np.asarray(mask_hw, dtype=np.float64)
        if mask.shape != tuple(self.frame_shape):
            raise InputError(f"mask is {list(mask.shape)}, the frames are {list(self.frame_shape)}")
        rows = _interval_overlap(self.shape[0], self.cell_size[0], mask.shape[0])  # [h, H]
        cols = _interval_overlap(self.shape[1], self.cell_size[1], mask.shape[1])  # [w, W]
        covered = rows @ mask @ cols.T
        area = np.outer(rows.sum(axis=1), cols.sum(axis=1))  # each cell's area inside the frame
        return np.where(area > 0, covered / np.maximum(area, 1e-12), 0.0).astype(np.float32)


def _interval_overlap(cells: int, cell_size: float, pixels: int) -> np.ndarray:
    """[cells, pixels]: length of the overlap of cell i, [i * cell_size, (i + 1) * cell_size), with pixel p, [p, p + 1)
    (frame pixel p is centred on p + 0.5 in these edge coordinates, as in FeatureGrid's cell centres)."""
    starts = np.arange(cells)[:, None] * float(cell_size)
    edges = np.arange(pixels + 1)[None, :]
    overlap = np.minimum(starts + cell_size, edges[:, 1:]) - np.maximum(starts, edges[:, :-1])
    return np.where(overlap > 1e-9 * cell_size, overlap, 0.0)  # edges that meet in floating point: no overlap


@dataclass(eq=False)
class PixelFeatures:
    """Per-pixel image features of the target frames, from the model's feature cache (encoded once per target).

    features_nchw: [N, C, h, w] float32 (N = frames); grid: where the cells lie on the frames."""

    features_nchw: np.ndarray
    grid: FeatureGrid
