"""The interface every segmentation model implements, device choice, and the model factory.

A `SliceModel` reads a target `SliceStack`, computes its image features once (cached by the stack's
fingerprint, so re-runs and every generator reuse them), and executes a `PromptPlan` over the frames.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Dict, Optional

import numpy as np

from ..contract import ModelCapabilities, PixelFeatures
from ..errors import InputError
from ..options import DEVICES, PRECISIONS
from ..progress import ProgressCallback, report

log = logging.getLogger("proxyprompt")

# the seed every random-weight model (`random`, `random_sam_vit_b`) is built from: `train` and `segment` in two
# processes must see the same frozen network, or a generator trained against it means nothing
RANDOM_SEED = 0



def select_device(requested: str = "auto") -> str:
    """auto: CUDA -> Apple MPS -> CPU (with a visible warning on CPU)."""
    import torch

    requested = (requested or "auto").lower()
    if requested not in DEVICES:
        raise InputError(f"unknown device '{requested}'; use auto, cpu, cuda or mps")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was requested but no CUDA GPU is available")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device mps was requested but Apple MPS is not available")
    if requested != "auto":
        device = requested
    elif torch.cuda.is_available():
        device = "cuda"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    if device == "cpu":
        log.warning("running the model on the CPU: expect seconds per slice (a CUDA GPU is ~100x faster)")
    return device


def cpu_has_amx() -> bool:
    """True when this CPU has Intel AMX tiles: there bf16 attention and matrix products ran 2.5-4.9x faster than
    float32 (2-core Xeon, `benchmarks/precision.py`). AVX512-BF16 alone is not enough: on a 2-core Xeon with it but
    without AMX, bf16 ran 0.6-0.9x of float32 (SDPA and linear layers) and SAM 2 propagation 1.6x slower."""
    import torch

    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # a private torch helper: absent or failing means "not known to be there"
        return False


def select_precision(requested: str = "auto", device: str = "cpu") -> str:
    """auto: bf16 on CUDA (as SAM 2's own demos run) and on CPUs with AMX, else fp32.
    MPS stays fp32 (its bf16 autocast coverage is incomplete)."""
    requested = (requested or "auto").lower()
    if requested not in PRECISIONS:
        raise InputError(f"unknown precision '{requested}'; use one of {', '.join(PRECISIONS)}")
    if requested == "bf16" and device == "mps":
        raise InputError("precision bf16 is not supported on Apple MPS; use fp32")
    if requested != "auto":
        return requested
    if device == "cuda" or (device == "cpu" and cpu_has_amx()):
        return "bf16"
    return "fp32"


def autocast(device: str, precision: str):
    """The autocast context of a model's forward passes (a no-op for fp32). Weights stay float32;
    matmuls, convolutions and attention run in bf16, outputs are cast back to float32 by the callers."""
    if precision != "bf16":
        return nullcontext()
    import torch

    return torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)


class SliceModel:
    """Base class of the models. Subclasses declare `capabilities` and implement `_encode` and `propagate` (and
    `pixel_features` / `slice_embeddings` / `embed_slices` where their capabilities say so)."""

    name = ""
    family = ""
    capabilities = ModelCapabilities()
    is_random = False  # real architecture with random weights: outputs are not accuracy
    device = "cpu"
    precision = "fp32"
    image_size = 1024
    FEATURE_CACHE_ENTRIES = 1  # stacks whose features are kept (one target at a time: memory stays bounded)
    OTHER_STACKS = 4  # reference stacks whose per-pixel features `other_pixel_features` keeps

    def __init__(self) -> None:
        self.encoder_calls = 0  # slices sent through the image encoder (tests count re-use)
        self.encode_seconds = 0.0  # wall time spent in the image encoder (the engine's per-phase profile)
        self._feature_cache: Dict[str, object] = {}
        self._other_features: Dict[str, PixelFeatures] = {}  # `other_pixel_features`, the last OTHER_STACKS

    def describe(self) -> str:
        text = f"{self.name} ({self.family}, {self.image_size} px, {self.device}, {self.precision})"
        return text + " with RANDOM weights: outputs are not accuracy" if self.is_random else text

    def features(self, frames, progress: Optional[ProgressCallback] = None, cancel=None, needed=None):
        """Image features of all frames, computed once per stack content and reused afterwards. `needed` (frame
        indices) lets a model that encodes frame by frame (SAM family) encode only those; this one encodes all."""
        key = frames.fingerprint()
        if key not in self._feature_cache:
            while len(self._feature_cache) >= self.FEATURE_CACHE_ENTRIES:  # keep memory bounded: oldest out
                self._feature_cache.pop(next(iter(self._feature_cache)))
            started = time.perf_counter()
            self._feature_cache[key] = self._encode(frames, progress, cancel)
            self.encode_seconds += time.perf_counter() - started
        else:
            report(progress, "encode", frames.num_slices, frames.num_slices)
            self._feature_cache[key] = self._feature_cache.pop(key)  # most recently used last
        return self._feature_cache[key]

    def encoded_slices(self, frames) -> int:
        """How many of the frames the model holds image features of (this one encodes all frames or none)."""
        return frames.num_slices if frames.fingerprint() in self._feature_cache else 0

    def _encode(self, frames, progress, cancel):  # pragma: no cover - interface
        raise NotImplementedError

    def slice_embeddings(self, frames, progress=None, cancel=None) -> np.ndarray:
        """[N, D] pooled, L2-normalised image embeddings of the frames (for slice similarity)."""
        raise NotImplementedError

    def embed_slices(self, images_khw: np.ndarray, cancel=None) -> np.ndarray:
        """[K, D] pooled, L2-normalised embeddings of arbitrary slices [K, H, W] in [0, 1] (capability
        `slice_embeddings`)."""
        raise InputError(f"model '{self.name}' does not embed arbitrary slices")

    def pixel_features(self, frames, progress=None, cancel=None) -> PixelFeatures:
        """Per-pixel image features [N, C, h, w] of the frames with their grid (capability `pixel_features`), from
        the same feature cache as propagation (encoded once per target)."""
        raise InputError(f"model '{self.name}' offers no per-pixel features")

    def other_pixel_features(self, frames, progress=None, cancel=None) -> PixelFeatures:
        """`pixel_features` of a stack that is not the target (a reference case), leaving the target's cached
        features in place (the next propagation does not re-encode the target). The last `OTHER_STACKS` stacks are
        kept: a re-run with the same reference encodes nothing."""
        key = frames.fingerprint()
        if key in self._other_features:
            self._other_features[key] = self._other_features.pop(key)  # most recently used last
            return self._other_features[key]
        kept = dict(self._feature_cache)
        try:
            features = self.pixel_features(frames, progress=progress, cancel=cancel)
        finally:
            self._feature_cache.clear()
            self._feature_cache.update(kept)
        self._other_features[key] = features
        while len(self._other_features) > self.OTHER_STACKS:
            self._other_features.pop(next(iter(self._other_features)))
        return features

    def decode_prompt_embeddings(self, features, frame_index: int, sparse_bt256, dense_b256hw=None):
        """The frozen mask decoder on one frame of `features` (what `features(frames)` returned) for B prompts given
        as torch tensors: sparse [B, T, 256], dense [B, 256, h, w] or None (the model's no-mask embedding) ->
        (low-resolution logits [B, 1, 4h, 4w] on the pixel features' `grid.refined(4)`, IoU scores [B]). Differentiable
        with respect to the prompt embeddings (the decoder's own weights never require grad): trained generators
        learn through it, and inference decodes `PromptEmbedding`s through the same call."""
        raise InputError(f"model '{self.name}' does not decode prompt embeddings")

    def propagate(self, frames, plan, corrections=None, progress=None, cancel=None) -> Dict[int, np.ndarray]:
        """Models with memory (capability `memory`) execute a PromptPlan themselves: label -> [N, H, W] float32
        foreground probability on the frames. Models without memory are driven slice by slice
        (`generators.propagation`) through `predict_slice(frame, box, mask_prior, frames=, embedding=)`."""
        raise NotImplementedError  # pragma: no cover - interface
