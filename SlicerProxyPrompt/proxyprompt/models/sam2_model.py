"""SAM 2 over a target's slices as a video, from in-memory tensors, with cached image features.

What differs from the stock `SAM2VideoPredictor` workflow (JPEG folder, one object at a time):

* Frames come from our `SliceStack` (one windowing rule per volume, float precision): replicated to 3
  channels, resized to S x S, ImageNet mean/std, exactly what `sam2.utils.misc.load_video_frames` does
  after reading a JPEG, minus the 8-bit round trip.
* Image features (backbone outputs) of every target slice are computed once (`_encode`, batched) and
  cached by the target's fingerprint; support (reference) slices are encoded once too, in their own
  cache keyed by their content. `_InMemoryVideoPredictor._get_image_feature` serves them to sam2, so a
  propagation never re-encodes a cached frame (a re-run after corrections costs memory attention and
  decoding only).
* The video is [support slices] + [target slices]; every label of the plan is one object of the same run.
  Each support slice is a conditioning frame (`add_new_mask` with its reference mask, SGP / FS-MedSAM2
  style); each target frame attends only the support slices `plan.support_attention` names for it (the
  generator's choice, e.g. the top-k most similar; see `_InMemoryVideoPredictor._prepare_memory_conditioned_features`).
* Objects are tracked as ONE batch per frame (`Sam2Model._track_frame`): sam2 1.1.0 runs every object
  separately (batch 1) through memory attention, mask decoder and memory encoder; we run the objects whose
  memories lie on the same frames together (batch = objects, image features shared), as SAM 2 did before
  objects were made independent. Same results within float tolerance (tested); `batch_objects = False`
  restores the per-object loop.
* Corrections: each corrected slice is a conditioning frame with its exact mask per label.
* Incremental re-run (`_Incremental`): the sam2 state of the last run is kept (one target, one plan). A re-run
  with the same plan whose only change is new corrected slices re-tracks only the frames downstream of each
  new correction (away from the start frame, up to the next conditioning frame or the volume end); every
  other frame keeps its previous output. Anything else (first run, other target/plan/labels, a correction
  removed) is a full run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..contract import FeatureGrid, ModelCapabilities, PixelFeatures, PromptEmbedding
from ..errors import CheckpointError, InputError
from ..progress import check_cancel, report
from .base import RANDOM_SEED, SliceModel, autocast, select_device, select_precision
from .checkpoint_file import load_into, read_state_dict
from .feature_cache import FeatureDiskCache, entry_key, model_identity

log = logging.getLogger("proxyprompt")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUPPORT_CACHE_SLICES = 256  # support slices whose features are kept (LRU)
GPU_FEATURE_BUDGET_BYTES = 4 << 30  # above this, cached features of a target live in CPU memory

_PREDICTOR_TARGET = "proxyprompt.models.sam2_model._InMemoryVideoPredictor"


def _torch():
    import torch

    return torch


def preprocess_slices(images: np.ndarray, image_size: int):
    """[N, H, W] float in [0, 1] -> [N, 3, S, S] float32 tensor, as SAM 2 expects (bilinear resize to
    S x S without keeping the aspect ratio, like `load_video_frames`; ImageNet mean/std)."""
    torch = _torch()
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]  # [N, 1, H, W]
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[None, :, None, None]
    return ((x - mean) / std).contiguous()


class _LazyFrames:
    """`inference_state["images"]`: indexable like sam2's [N, 3, S, S] tensor, built per frame on demand
    (sam2 only reads it on a feature-cache miss, which our cache avoids), so no copy of the video is held."""

    def __init__(self, images: np.ndarray, image_size: int) -> None:
        self._images = images
        self._image_size = image_size

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, index: int):
        return preprocess_slices(self._images[index : index + 1], self._image_size)[0]


class FrameFeatures:
    """Backbone outputs of a stack of frames, computed once.

    fpn: list of per-level tensors [N, C_l, H_l, W_l] (level 0/1 already projected by the SAM decoder's
    conv_s0/conv_s1, as `forward_image` does); pos: per-level positional encodings [1, C_l, H_l, W_l]
    (identical for every frame); embeddings: [N, D] pooled L2-normalised top-level features.
    """

    def __init__(self, fpn, pos, embeddings: np.ndarray) -> None:
        self.fpn = fpn
        self.pos = pos
        self.embeddings = embeddings

    @property
    def num_frames(self) -> int:
        return int(self.fpn[0].shape[0])

    def backbone_out(self, index: int, device):
        return {
            "backbone_fpn": [level[index : index + 1].to(device, non_blocking=True).float() for level in self.fpn],
            "vision_pos_enc": [p.to(device, non_blocking=True) for p in self.pos],
        }

    def nbytes(self) -> int:
        return int(sum(level.numel() * level.element_size() for level in self.fpn))


def _pool_embeddings(top_level) -> np.ndarray:
    """[B, C, h, w] -> [B, C] spatially mean-pooled, L2-normalised (float64 numpy)."""
    pooled = top_level.float().mean(dim=(2, 3)).double().cpu().numpy()
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)


def _make_predictor_class():
    """Defined lazily so that importing this module does not import torch / sam2."""
    torch = _torch()
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    class InMemoryVideoPredictor(SAM2VideoPredictor):
        """SAM2VideoPredictor fed from in-memory tensors and from a precomputed feature store."""

        @torch.inference_mode()
        def init_state_from_features(
            self,
            frame_features: List["FrameFeatures"],
            frame_images: np.ndarray,
            video_height: int,
            video_width: int,
            offload_state_to_cpu: bool = False,
        ):
            """The inference state of sam2 1.1.0's `init_state`, from frames already in memory.

            frame_features: FrameFeatures blocks whose frames, concatenated, are the video's frames;
            frame_images: [N, H, W] windowed slices of the same video (only read on a cache miss).
            """
            compute_device = self.device
            state = {}
            state["images"] = _LazyFrames(frame_images, self.image_size)
            state["num_frames"] = len(state["images"])
            state["offload_video_to_cpu"] = True  # frames are never held on the device
            state["offload_state_to_cpu"] = offload_state_to_cpu
            state["video_height"] = int(video_height)
            state["video_width"] = int(video_width)
            state["device"] = compute_device
            state["storage_device"] = torch.device("cpu") if offload_state_to_cpu else compute_device
            state["point_inputs_per_obj"] = {}
            state["mask_inputs_per_obj"] = {}
            state["cached_features"] = {}
            state["constants"] = {}
            state["obj_id_to_idx"] = OrderedDict()
            state["obj_idx_to_id"] = OrderedDict()
            state["obj_ids"] = []
            state["output_dict_per_obj"] = {}
            state["temp_output_dict_per_obj"] = {}
            state["frames_tracked_per_obj"] = {}
            # ours: video frame -> (FrameFeatures, row) for the precomputed features
            lookup = {}
            for block in frame_features:
                for row in range(block.num_frames):
                    lookup[len(lookup)] = (block, row)
            if len(lookup) != state["num_frames"]:
                raise ValueError("feature blocks and frames disagree in length")
            state["feature_lookup"] = lookup
            state["encoder_misses"] = 0
            return state

        def _get_image_feature(self, inference_state, frame_idx, batch_size):
            """Features from our store (never re-encoded); sam2's own path only on a miss."""
            lookup = inference_state.get("feature_lookup", {})
            if frame_idx in lookup:
                block, row = lookup[frame_idx]
                backbone_out = block.backbone_out(row, inference_state["device"])
                image = None  # the pixel tensor is not used by any caller in sam2 1.1.0
            else:
                cached = inference_state["cached_features"].get(frame_idx)
                if cached is None:
                    image = inference_state["images"][frame_idx].to(inference_state["device"]).float().unsqueeze(0)
                    backbone_out = self.forward_image(image)
                    inference_state["cached_features"] = {frame_idx: (image, backbone_out)}
                    inference_state["encoder_misses"] = inference_state.get("encoder_misses", 0) + 1
                else:
                    image, backbone_out = cached
            expanded = {
                "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in backbone_out["backbone_fpn"]],
                "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in backbone_out["vision_pos_enc"]],
            }
            features = self._prepare_backbone_features(expanded)
            expanded_image = image.expand(batch_size, -1, -1, -1) if image is not None else None
            return (expanded_image,) + features

        def _prepare_memory_conditioned_features(self, frame_idx, is_init_cond_frame, current_vision_feats,
                                                 current_vision_pos_embeds, feat_sizes, output_dict, num_frames,
                                                 track_in_reverse=False):
            """Per-frame choice of the conditioning memories (support-memory, SGP style).

            sam2 attends to ALL conditioning frames of `output_dict["cond_frame_outputs"]` (all with
            temporal slot 0), and an unselected conditioning frame that happens to lie among the last 6
            frames in the tracking direction is used as an ordinary memory. When `cond_selection` is set
            (by `Sam2Model.propagate`), the frame being tracked sees a *view* of the output dict whose
            conditioning outputs are restricted to `cond_selection[frame_idx]` = the support slices the plan
            names for it plus every conditioning frame of the target itself (prompts, corrections).
            The non-conditioning memories (the previous 6 tracked target frames) and the object-pointer
            rules are sam2's own; removed supports cannot leak back in as "recent" memories because the
            view does not contain them at all. Nothing is copied (the view shares the stored outputs).

            `_memory_floor` (incremental re-run, forward direction): non-conditioning outputs of frames
            below it (the frames a full run tracks in reverse, AFTER its forward pass) are left out of the
            view, so a re-tracked forward frame sees the same kind of memories as in a full run.
            """
            floor = getattr(self, "_memory_floor", None)
            if floor is not None:
                output_dict = {
                    "cond_frame_outputs": output_dict["cond_frame_outputs"],
                    "non_cond_frame_outputs": {t: out for t, out in output_dict["non_cond_frame_outputs"].items()
                                               if t >= floor},
                }
            selection = getattr(self, "_active_selection", None)
            if selection is not None and not is_init_cond_frame and frame_idx in selection:
                allowed = selection[frame_idx]
                cond = {t: out for t, out in output_dict["cond_frame_outputs"].items() if t in allowed}
                if cond:
                    output_dict = {
                        "cond_frame_outputs": cond,
                        "non_cond_frame_outputs": output_dict["non_cond_frame_outputs"],
                    }
            return super()._prepare_memory_conditioned_features(
                frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                output_dict, num_frames, track_in_reverse,
            )

    return InMemoryVideoPredictor


_PREDICTOR_CLASS = None


def __getattr__(name):  # module attribute used as the hydra `_target_` of the predictor
    global _PREDICTOR_CLASS
    if name == "_InMemoryVideoPredictor":
        if _PREDICTOR_CLASS is None:
            _PREDICTOR_CLASS = _make_predictor_class()
        return _PREDICTOR_CLASS
    raise AttributeError(name)


def hydra_overrides(image_size: int) -> List[str]:
    """Overrides for `build`: our predictor class, sam2's video post-processing, optional 512 px."""
    overrides = [
        f"++model._target_={_PREDICTOR_TARGET}",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        "++model.fill_hole_area=8",
    ]
    if image_size != 1024:
        side = image_size // 16
        overrides += [
            f"++model.image_size={image_size}",
            f"++model.memory_attention.layer.self_attention.feat_sizes=[{side},{side}]",
            f"++model.memory_attention.layer.cross_attention.feat_sizes=[{side},{side}]",
        ]
    return overrides


def build_predictor(config: str, checkpoint: Optional[Path], device: str, image_size: int, seed: int = RANDOM_SEED):
    """Instantiate the SAM 2 video predictor (our subclass) from its hydra config; load the checkpoint
    ourselves with `torch.load(weights_only=True)`; no checkpoint: random weights from a fixed seed."""
    torch = _torch()
    import sam2  # noqa: F401  (registers the hydra config module)
    from hydra import compose
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(config_name=config, overrides=hydra_overrides(image_size))
    OmegaConf.resolve(cfg)
    devices = [device] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = instantiate(cfg.model, _recursive_=True)
    if checkpoint is not None:
        missing, unexpected = load_into(model, read_state_dict(checkpoint), checkpoint, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {checkpoint} does not fit {config}: {len(missing)} missing, "
                f"{len(unexpected)} unexpected keys (e.g. {(list(missing) + list(unexpected))[:3]})"
            )
    try:  # sam2 skips hole filling (with a warning per call) when its CUDA extension is missing
        from sam2 import _C  # noqa: F401
    except ImportError:
        model.fill_hole_area = 0
    model = model.to(device)
    model.eval()
    return model


class Sam2Model(SliceModel):
    """SAM 2 / 2.1 video predictor over a target's slices (see the module docstring)."""

    def __init__(self, spec, checkpoint=None, device: str = "auto", image_size: Optional[int] = None,
                 encode_batch: Optional[int] = None, precision: str = "auto") -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.family = spec.family
        self.is_random = spec.family == "random"
        self.image_size = int(image_size or spec.image_size or 1024)
        if self.image_size not in (512, 1024):
            raise InputError(f"--image-size must be 1024 or 512 for SAM 2 models, got {self.image_size}")
        self.device = select_device(device)
        self.precision = select_precision(precision, self.device)
        if self.is_random:
            if checkpoint is not None:
                raise InputError("model 'random' uses no checkpoint; drop --checkpoint or pick a SAM 2 model")
            checkpoint_path = None
        else:
            from .download import resolve_checkpoint

            checkpoint_path = Path(resolve_checkpoint(spec, checkpoint))
        self.checkpoint = checkpoint_path
        config = spec.config or "configs/sam2.1/sam2.1_hiera_t.yaml"
        self.predictor = build_predictor(config, checkpoint_path, self.device, self.image_size)
        self.predictor.requires_grad_(False)  # frozen: trained generators learn through the decoder, never into it
        self.encode_batch = int(encode_batch or (8 if self.device == "cuda" else 2))
        self._support_cache: "OrderedDict[str, FrameFeatures]" = OrderedDict()
        self.disk_cache = FeatureDiskCache()  # support features across processes (models/feature_cache.py)
        self.support_encoder_calls = 0  # support slices encoded (not read from a cache)
        self.support_disk_hits = 0  # support slices read from the disk cache
        self.reference_encode_seconds = 0.0  # the part of `encode_seconds` spent on support slices
        self._pos = None  # the backbone's positional encodings (position_encodings)
        self._last_run: Dict[str, object] = {}
        self._incremental: Optional[_Incremental] = None  # the last run's state (one target; see _Incremental)
        self.frames_propagated = 0  # frames sent through the tracking loop by the last propagate()
        self.batch_objects = True  # track all objects of a run as one batch (False: sam2 1.1.0's per-object loop)
        side = self.image_size // 16
        # memory (the video predictor: support slices, start frame); no soft prior input
        self.capabilities = ModelCapabilities(
            memory=True, support_attention=True, boxes=True, points=True, masks=True, prior=False, embeddings=True,
            pixel_features=True, slice_embeddings=True, feature_grid=(side, side))

    # ---------------------------------------------------------------- helpers
    @contextmanager
    def _forward_mode(self):
        """Grad-free forward passes at the model's precision (autocast for bf16).

        `no_grad`, not `inference_mode`: torch skips autocast's weight-cast cache under `inference_mode`, so bf16
        would re-cast every Linear / conv weight at every call (~140 casts per tracked frame: tens of us each on
        an idle CPU, milliseconds when the CPU is shared). The per-call cast is also not `requires_grad`, which
        makes `matmul` take its bmm path for a Linear on a permuted input (memory encoder CXBlock): a 100 MB copy
        of the weight expanded over the batch per call at 1024 px. Under `no_grad` each weight is cast once per
        context and matmul folds to mm. Same arithmetic (bf16 weights, fp32 elsewhere): bit-identical outputs."""
        torch = _torch()
        with torch.no_grad(), autocast(self.device, self.precision):
            yield

    def _encode_images(self, images: np.ndarray, progress=None, cancel=None, phase="encode") -> FrameFeatures:
        """Backbone outputs of [N, H, W] slices, batched; counts `encoder_calls`."""
        torch = _torch()
        count = int(images.shape[0])
        levels, pos, pooled = None, None, []
        offload = self.device != "cpu"
        for start in range(0, count, self.encode_batch):
            check_cancel(cancel)
            chunk = preprocess_slices(images[start : start + self.encode_batch], self.image_size).to(self.device)
            with self._forward_mode():
                out = self.predictor.forward_image(chunk)
            fpn = [level.float() for level in out["backbone_fpn"]]
            if levels is None:
                per_frame = sum(level[0].numel() * 4 for level in fpn)
                keep_on_device = offload and per_frame * count <= GPU_FEATURE_BUDGET_BYTES
                store = self.device if keep_on_device else "cpu"
                levels = [torch.empty((count,) + tuple(level.shape[1:]), dtype=torch.float32, device=store)
                          for level in fpn]
                pos = [p[0:1].float().to(store) for p in out["vision_pos_enc"]]
            for level, value in zip(levels, fpn):
                level[start : start + value.shape[0]] = value.to(level.device)
            pooled.append(_pool_embeddings(fpn[-1]))
            self.encoder_calls += int(chunk.shape[0])
            report(progress, phase, min(start + self.encode_batch, count), count)
        return FrameFeatures(levels, pos, np.concatenate(pooled, axis=0))

    def _encode(self, frames, progress, cancel) -> FrameFeatures:
        return self._encode_images(frames.images, progress, cancel)

    def slice_embeddings(self, frames, progress=None, cancel=None) -> np.ndarray:
        """[N, D] pooled, L2-normalised top-level image features (from the cached features)."""
        return np.array(self.features(frames, progress, cancel).embeddings, copy=True)

    def pixel_features(self, frames, progress=None, cancel=None) -> PixelFeatures:
        """[N, 256, S/16, S/16] top-level backbone features of the frames (cached, encoded once per target); each
        frame is stretched to S x S, so a cell covers (H / h) x (W / w) frame pixels."""
        features = self.features(frames, progress, cancel)
        array = features.fpn[-1].float().cpu().numpy().astype(np.float32, copy=True)
        grid_h, grid_w = array.shape[-2:]
        grid = FeatureGrid((grid_h, grid_w), (frames.height / grid_h, frames.width / grid_w), (grid_h, grid_w),
                           (frames.height, frames.width))
        return PixelFeatures(array, grid)

    def decode_prompt_embeddings(self, features, frame_index: int, sparse_bt256, dense_b256hw=None):
        """SAM 2's frozen mask decoder on one frame as a conditioning frame without memory (the top-level feature
        plus `no_mem_embed`, the high-resolution levels as skip features), for B prompts (see `SliceModel`)."""
        predictor = self.predictor
        index = int(frame_index)
        top = features.fpn[-1][index:index + 1].to(self.device).float()
        if predictor.directly_add_no_mem_embed:
            top = top + predictor.no_mem_embed.reshape(1, -1, 1, 1)
        high_res = None
        if predictor.use_high_res_features_in_sam:
            high_res = [level[index:index + 1].to(self.device).float() for level in features.fpn[:-1]]
        batch = int(sparse_bt256.shape[0])
        if dense_b256hw is None:
            grid = tuple(self.capabilities.feature_grid)
            weight = predictor.sam_prompt_encoder.no_mask_embed.weight
            dense_b256hw = weight.reshape(1, -1, 1, 1).expand(batch, -1, grid[0], grid[1])
        logits, iou, _, _ = predictor.sam_mask_decoder(
            image_embeddings=top, image_pe=predictor.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse_bt256, dense_prompt_embeddings=dense_b256hw, multimask_output=False,
            repeat_image=True, high_res_features=high_res)
        return logits, iou.reshape(-1)

    @contextmanager
    def _prompt_embeddings(self, embedding: PromptEmbedding):
        """While active, SAM 2's prompt encoder returns the given prompt embeddings (sparse [1, T, 256], dense
        [1, 256, h, w] or its own no-mask embedding) instead of encoding the (placeholder) point."""
        torch = _torch()
        encoder = self.predictor.sam_prompt_encoder
        grid = tuple(self.capabilities.feature_grid)
        if embedding.dense_256hw is not None and tuple(embedding.dense_256hw.shape[1:]) != grid:
            raise InputError(f"dense prompt embedding is {list(embedding.dense_256hw.shape)}, model '{self.name}' "
                             f"at {self.image_size} px needs [256, {grid[0]}, {grid[1]}]")
        original = encoder.forward

        def forward(points, boxes, masks):
            sparse, dense = original(points, boxes, masks)
            sparse = torch.from_numpy(embedding.sparse_tokens_t256)[None].to(sparse.device, sparse.dtype)
            if embedding.dense_256hw is not None:
                dense = torch.from_numpy(embedding.dense_256hw)[None].to(dense.device, dense.dtype)
            return sparse, dense

        encoder.forward = forward
        try:
            yield
        finally:
            del encoder.forward  # back to the class's forward

    def feature_identity(self) -> str:
        """What the support features depend on besides the slice (the disk cache's model part of the key)."""
        import sam2

        weights = "random-seed-%d" % RANDOM_SEED if self.checkpoint is None else (
            getattr(self.spec, "sha256", None) or f"{self.checkpoint.resolve()}:{self.checkpoint.stat().st_size}:"
                                                  f"{self.checkpoint.stat().st_mtime_ns}")
        return model_identity("sam2", self.name, weights, self.spec.config, self.image_size, self.precision,
                              self.device, getattr(sam2, "__version__", "?"))

    def position_encodings(self):
        """The backbone's positional encodings per level ([1, C, H, W] float32; the same for every frame): from the
        neck on zero trunk outputs (cheap), so features read from the disk cache need no encoder pass."""
        if self._pos is None:
            torch = _torch()
            encoder = self.predictor.image_encoder
            channels = list(reversed(encoder.neck.backbone_channel_list))  # trunk order: stride 4 first
            trunk = [torch.zeros((1, c, self.image_size // s, self.image_size // s), device=self.device)
                     for c, s in zip(channels, (4, 8, 16, 32))]
            with self._forward_mode():
                _, pos = encoder.neck(trunk)
            if encoder.scalp > 0:
                pos = pos[: -encoder.scalp]
            self._pos = [p[0:1].float() for p in pos]
        return self._pos

    def _disk_entry(self, features: FrameFeatures, row: int) -> dict:
        """One support slice's features as stored on disk: bf16 where that is exact (autocast outputs)."""
        torch = _torch()
        entry = {"embedding": torch.from_numpy(np.ascontiguousarray(features.embeddings[row : row + 1]))}
        for level, value in enumerate(features.fpn):
            value = value[row : row + 1].cpu()
            narrow = value.to(torch.bfloat16)
            entry[f"fpn{level}"] = narrow if torch.equal(narrow.float(), value) else value
        return entry

    def _from_disk_entry(self, entry: dict) -> Optional[FrameFeatures]:
        torch = _torch()
        levels = len(self.position_encodings())
        try:
            fpn = [entry[f"fpn{level}"].float() for level in range(levels)]
            embedding = entry["embedding"].double().numpy()
        except (KeyError, AttributeError):
            return None
        store = self.device if self.device != "cpu" else "cpu"
        return FrameFeatures([level.to(store) for level in fpn], [p.to(store) for p in self.position_encodings()],
                             embedding)

    def support_features(self, images: np.ndarray, cancel=None) -> FrameFeatures:
        """Features of support (reference) slices, cached by content: in memory (kept across runs and targets) and on
        disk (`feature_cache`: kept across processes, so a second target from the same reference encodes none)."""
        torch = _torch()
        keys, missing = [], []
        for index in range(images.shape[0]):
            digest = hashlib.sha1(np.ascontiguousarray(images[index], dtype=np.float32).tobytes())
            digest.update(str(images[index].shape).encode())
            key = digest.hexdigest()
            keys.append(key)
            if key in self._support_cache:
                self._support_cache.move_to_end(key)
            elif key not in [k for k, _ in missing]:
                missing.append((key, index))
        if missing and self.disk_cache.enabled:
            identity = self.feature_identity()
            still = []
            for key, index in missing:
                stored = self.disk_cache.get(entry_key(identity, key))
                features = self._from_disk_entry(stored) if stored is not None else None
                if features is None:
                    still.append((key, index))
                else:
                    self._support_cache[key] = features
                    self.support_disk_hits += 1
            missing = still
        if missing:
            started = time.perf_counter()
            encoded = self._encode_images(images[[i for _, i in missing]], cancel=cancel, phase="encode-support")
            self.encode_seconds += time.perf_counter() - started
            self.reference_encode_seconds += time.perf_counter() - started
            self.support_encoder_calls += len(missing)
            identity = self.feature_identity() if self.disk_cache.enabled else None
            for row, (key, _) in enumerate(missing):
                self._support_cache[key] = FrameFeatures(
                    [level[row : row + 1] for level in encoded.fpn], encoded.pos, encoded.embeddings[row : row + 1]
                )
                if identity is not None:
                    self.disk_cache.put(entry_key(identity, key), self._disk_entry(encoded, row))
        parts = [self._support_cache[key] for key in keys]
        while len(self._support_cache) > max(SUPPORT_CACHE_SLICES, len(keys)):
            self._support_cache.popitem(last=False)
        if not parts:
            return None
        store = parts[0].fpn[0].device
        fpn = [torch.cat([p.fpn[level].to(store) for p in parts]) for level in range(len(parts[0].fpn))]
        return FrameFeatures(fpn, parts[0].pos, np.concatenate([p.embeddings for p in parts]))

    def embed_slices(self, images: np.ndarray, cancel=None) -> np.ndarray:
        """[K, D] pooled, L2-normalised embeddings of arbitrary slices ([K, H, W] in [0, 1]), e.g. reference
        slices; their features are cached with the support features (a later propagate reuses them)."""
        features = self.support_features(np.asarray(images, dtype=np.float32), cancel)
        return np.array(features.embeddings, copy=True)

    # ---------------------------------------------------------------- propagation
    def propagate(self, frames, plan, corrections=None, progress=None, cancel=None) -> Dict[int, np.ndarray]:
        """Execute a PromptPlan over the target frames: label -> [N, H, W] float32 probability.

        Incremental when the previous run's state allows it (see `_Incremental`); `frames_propagated` counts
        the frames this call sent through the tracking loop, `_last_run["incremental"]` says which path ran."""
        torch = _torch()
        predictor = self.predictor
        count, height, width = frames.num_slices, frames.height, frames.width
        labels = list(plan.labels)
        target_features = self.features(frames, progress, cancel)
        # the kept state is valid again only when this run completes (cancel / error mid-run -> full run next)
        previous, self._incremental = self._incremental, None
        self.frames_propagated = 0

        # ---- support slices (reference slices as conditioning memory), resized to the target's H x W
        support = list(plan.support or [])
        support_images = None
        if support:
            support_images = np.stack([_fit(s.image.astype(np.float32), height, width, order=1) for s in support])
        support_features = self.support_features(support_images, cancel) if support else None
        offset = len(support)

        # ---- conditioning on target frames: corrections > object masks > boxes/points
        corrected = set(corrections.frames) if corrections is not None else set()
        conditioning: Dict[int, Dict[int, tuple]] = {v: {} for v in labels}  # label -> frame -> (kind, value)
        for value in labels:
            prompt = plan.objects[value]
            for frame, box in (prompt.boxes or {}).items():
                if box is not None:
                    conditioning[value][int(frame)] = ("box", np.asarray(box, dtype=np.float32))
            for frame, (coords, point_labels) in (prompt.points or {}).items():
                existing = conditioning[value].get(int(frame))
                box = existing[1] if existing is not None and existing[0] == "box" else None
                conditioning[value][int(frame)] = ("points", (box, np.asarray(coords), np.asarray(point_labels)))
            for frame, embedding in (prompt.embeddings or {}).items():
                conditioning[value][int(frame)] = ("embedding", embedding)
            for frame, mask in (prompt.masks or {}).items():
                conditioning[value][int(frame)] = ("mask", np.asarray(mask, dtype=bool))
            for frame in corrected:
                conditioning[value][frame] = ("mask", corrections.labels[frame] == value)
        target_cond_frames = sorted({f for per in conditioning.values() for f in per})
        for frame in target_cond_frames:
            if not 0 <= frame < count:
                raise InputError(f"a prompt names slice {frame}, outside the target's {count} slices")

        active = []  # labels that get any conditioning: the objects of this run
        for value in labels:
            has_support = any(value in s.masks and np.any(s.masks[value]) for s in support)
            if has_support or conditioning[value]:
                active.append(value)
        results = {v: np.zeros((count, height, width), dtype=np.float32) for v in labels}
        if not active:
            self._last_run = {"support_frames": offset, "objects": [], "encoder_misses": 0, "incremental": False}
            return results

        key = (frames.fingerprint(), _plan_fingerprint(plan, support_images, self.image_size))
        corrected_masks = {f: np.array(corrections.labels[f], copy=True) for f in sorted(corrected)}
        new_frames = _Incremental.new_corrections(previous, key, active, corrected_masks)
        # which conditioning frames each target frame attends (recomputed: new corrections are conditioning)
        selection = self._cond_selection(plan.support_attention, offset, count, target_cond_frames)
        with self._forward_mode():
            if new_frames is None:
                start = self._start_frame(plan, target_cond_frames, count)
                blocks = ([support_features] if support_features is not None else []) + [target_features]
                images = np.concatenate([support_images, frames.images]) if support else frames.images
                state = predictor.init_state_from_features(blocks, images, height, width)
                support_masks = {value: [self._support_mask(s, value, height, width) for s in support]
                                 for value in active}
                if self.batch_objects and support:
                    self._add_support_frames(state, active, support_masks)
                for value in active:
                    if not self.batch_objects:
                        for index, mask in enumerate(support_masks[value]):
                            predictor.add_new_mask(state, index, value, torch.from_numpy(mask))
                    for frame, (kind, payload) in sorted(conditioning[value].items()):
                        video_frame = offset + frame
                        if kind == "mask":
                            predictor.add_new_mask(state, video_frame, value, torch.from_numpy(np.ascontiguousarray(payload)))
                        elif kind == "box":
                            predictor.add_new_points_or_box(state, video_frame, value, box=payload)
                        elif kind == "embedding":  # a placeholder point whose encoding is replaced
                            with self._prompt_embeddings(payload):
                                predictor.add_new_points_or_box(state, video_frame, value,
                                                                points=np.zeros((1, 2), np.float32),
                                                                labels=np.ones(1, np.int32))
                        else:
                            box, coords, point_labels = payload
                            predictor.add_new_points_or_box(state, video_frame, value, points=coords,
                                                            labels=point_labels, box=box)
                predictor.propagate_in_video_preflight(state)
                passes = [(list(range(start, count)), False), (list(range(start - 1, -1, -1)), True)]
            else:
                state, start = previous.state, previous.start
                passes = self._add_corrections(state, offset, start, new_frames, corrected_masks,
                                               set(target_cond_frames), count)
            predictor._active_selection = selection
            try:
                total = sum(len(order) for order, _ in passes)
                done = 0
                for order, reverse in passes:
                    # forward re-tracking (incremental) must not see the reverse-tracked frames' memories
                    predictor._memory_floor = offset + start if (new_frames is not None and not reverse) else None
                    for frame in order:
                        check_cancel(cancel)
                        self._track_frame(state, offset + frame, reverse)
                        done += 1
                        self.frames_propagated += 1
                        report(progress, "propagate", done, total)
            finally:
                predictor._active_selection = None
                predictor._memory_floor = None
            self._collect(state, offset, count, height, width, results)
        self._incremental = _Incremental(key, tuple(state["obj_ids"]), start, corrected_masks, state)
        self._last_run = {"support_frames": offset, "objects": list(state["obj_ids"]),
                          "encoder_misses": state.get("encoder_misses", 0), "incremental": new_frames is not None,
                          "frames_propagated": self.frames_propagated, "new_corrections": list(new_frames or [])}
        return results

    def _add_corrections(self, state, offset: int, start: int, new_frames: Sequence[int],
                         corrected_masks: Dict[int, np.ndarray], cond_frames: set, count: int):
        """Incremental re-run: make each new corrected frame a conditioning frame of the kept state (exactly as
        a first run adds it: an initial conditioning mask, output = the mask), and return the tracking passes
        that re-propagate only its downstream frames: away from the start frame (the direction the frame was
        reached in; both ways for the start frame itself), up to the next conditioning frame or the volume end.
        Forward passes come first (ascending), then reverse ones (descending), as in a full run."""
        torch = _torch()
        predictor = self.predictor
        reached_reverse = {f: state["frames_tracked_per_obj"][0].get(offset + f, {}).get("reverse", f < start)
                           for f in new_frames}
        for frame in new_frames:
            video_frame = offset + frame
            for value in state["obj_ids"]:
                obj_idx = state["obj_id_to_idx"][value]
                state["frames_tracked_per_obj"][obj_idx].pop(video_frame, None)  # -> an initial conditioning frame
                for storage in ("cond_frame_outputs", "non_cond_frame_outputs"):
                    state["output_dict_per_obj"][obj_idx][storage].pop(video_frame, None)
                mask = np.ascontiguousarray(corrected_masks[frame] == value)
                predictor.add_new_mask(state, video_frame, value, torch.from_numpy(mask))
        predictor.propagate_in_video_preflight(state)
        forward, backward = [], []
        for frame in sorted(new_frames):
            if frame == start or not reached_reverse[frame]:
                order = [frame]
                for f in range(frame + 1, count):
                    if f in cond_frames:
                        break
                    order.append(f)
                forward.append((order, False))
            if frame == start or reached_reverse[frame]:
                order = [] if frame == start else [frame]
                for f in range(frame - 1, -1, -1):
                    if f in cond_frames:
                        break
                    order.append(f)
                backward.append((order, True))
        return forward + backward[::-1]

    @staticmethod
    def _support_mask(support_slice, value: int, height: int, width: int) -> np.ndarray:
        """[H, W] bool: the support slice's mask of `value` on the target's grid (empty when it has none)."""
        mask = support_slice.masks.get(value)
        if mask is None:
            return np.zeros((height, width), bool)
        return np.ascontiguousarray(_fit(mask.astype(np.uint8), height, width, 0) > 0)

    def _add_support_frames(self, state, active: Sequence[int], support_masks: Dict[int, List[np.ndarray]]) -> None:
        """Every support slice as an initial conditioning frame of every object, the objects of a slice as ONE
        batch: what `add_new_mask` per object + `propagate_in_video_preflight` compute (the mask resized to the
        model's input as `add_new_mask` does, SAM heads for the object pointer, the memory encoder on the output
        upsampled as the preflight does, `is_mask_from_pts=True`), with one decoder and one memory-encoder call
        per slice instead of one per object, and without `add_new_mask`'s video-resolution output, which nothing
        reads. Equal to the per-object path within float tolerance (`batch_objects = False` runs that path).
        Objects are registered in `active` order, as the per-object path registers them."""
        torch = _torch()
        predictor = self.predictor
        size = predictor.image_size
        device = state["device"]
        obj_indices = [predictor._obj_id_to_idx(state, value) for value in active]
        for index in range(len(next(iter(support_masks.values())))):
            # add_new_mask's rule: bilinear + antialias to the model's input, then >= 0.5
            masks = torch.stack([torch.from_numpy(support_masks[value][index]) for value in active])[:, None]
            mask_inputs = torch.nn.functional.interpolate(masks.float().to(device), size=(size, size),
                                                          align_corners=False, mode="bilinear", antialias=True)
            mask_inputs = (mask_inputs >= 0.5).float()
            out, _ = predictor._run_single_frame_inference(
                inference_state=state, output_dict=state["output_dict_per_obj"][obj_indices[0]], frame_idx=index,
                batch_size=len(active), is_init_cond_frame=True, point_inputs=None, mask_inputs=mask_inputs,
                reverse=False, run_mem_encoder=False)
            high_res_masks = torch.nn.functional.interpolate(out["pred_masks"].to(device), size=(size, size),
                                                             mode="bilinear", align_corners=False)
            maskmem_features, maskmem_pos_enc = predictor._run_memory_encoder(
                inference_state=state, frame_idx=index, batch_size=len(active), high_res_masks=high_res_masks,
                object_score_logits=out["object_score_logits"], is_mask_from_pts=True)
            out["maskmem_features"], out["maskmem_pos_enc"] = maskmem_features, maskmem_pos_enc
            for row, obj_idx in enumerate(obj_indices):
                state["mask_inputs_per_obj"][obj_idx][index] = mask_inputs[row : row + 1]
                state["output_dict_per_obj"][obj_idx]["cond_frame_outputs"][index] = {
                    key: (None if value is None else [v[row : row + 1] for v in value] if isinstance(value, list)
                          else value[row : row + 1]) for key, value in out.items()}

    @staticmethod
    def _collect(state, offset: int, count: int, height: int, width: int, results) -> None:
        """Probabilities of every target frame from the low-res logits the sam2 state holds (the outputs
        `_track_frame` returned for them; the same upsampling, so kept frames are bit-identical)."""
        torch = _torch()
        for frame in range(count):
            outputs = []
            for obj_idx in range(len(state["obj_ids"])):
                obj_output_dict = state["output_dict_per_obj"][obj_idx]
                out = obj_output_dict["cond_frame_outputs"].get(offset + frame)
                if out is None:
                    out = obj_output_dict["non_cond_frame_outputs"][offset + frame]
                outputs.append(out["pred_masks"].to(state["device"], non_blocking=True))
            logits = torch.cat(outputs, dim=0)[:, 0].float()
            for obj_index, value in enumerate(state["obj_ids"]):
                results[value][frame] = _sigmoid_at(logits[obj_index], height, width)

    def _track_frame(self, state, video_frame: int, reverse: bool):
        """One frame of sam2's `propagate_in_video` for every object (no tqdm, our progress/cancel).

        Batched (`batch_objects`, default): the objects to track on this frame whose memories lie on the same
        frames (always the case for our plans unless boxes/points differ per label) go through `track_step`
        as ONE batch (memory attention, mask decoder and memory encoder with batch = objects; the frame's
        image features are shared, expanded along the batch), as SAM 2 did before objects were tracked
        independently; each object's memories are its own rows of the batch, so the result equals the
        per-object path up to float summation order. Outputs are stored per object as before (rows of the
        batch), so `_collect`, corrections and the incremental re-run see the same state layout."""
        torch = _torch()
        predictor = self.predictor
        n_obj = len(state["obj_ids"])
        pred = [None] * n_obj
        groups: Dict[tuple, List[int]] = {}
        for obj_idx in range(n_obj):
            obj_output_dict = state["output_dict_per_obj"][obj_idx]
            if video_frame in obj_output_dict["cond_frame_outputs"]:
                out = obj_output_dict["cond_frame_outputs"][video_frame]
                pred[obj_idx] = out["pred_masks"].to(state["device"], non_blocking=True)
            elif self.batch_objects:
                signature = (tuple(sorted(obj_output_dict["cond_frame_outputs"])),
                             tuple(sorted(obj_output_dict["non_cond_frame_outputs"])))
                groups.setdefault(signature, []).append(obj_idx)
            else:
                groups[(obj_idx,)] = [obj_idx]
        for members in groups.values():
            if len(members) == 1:
                output_dict = state["output_dict_per_obj"][members[0]]
            else:
                output_dict = self._merged_output_dict(state, members)
            out, pred_masks = predictor._run_single_frame_inference(
                inference_state=state, output_dict=output_dict, frame_idx=video_frame, batch_size=len(members),
                is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=reverse,
                run_mem_encoder=True,
            )
            for row, obj_idx in enumerate(members):
                if len(members) == 1:
                    obj_out = out
                else:
                    obj_out = {key: (None if value is None else
                                     [v[row : row + 1] for v in value] if isinstance(value, list) else
                                     value[row : row + 1]) for key, value in out.items()}
                state["output_dict_per_obj"][obj_idx]["non_cond_frame_outputs"][video_frame] = obj_out
                pred[obj_idx] = pred_masks[row : row + 1]
        for obj_idx in range(n_obj):
            state["frames_tracked_per_obj"][obj_idx][video_frame] = {"reverse": reverse}
        return torch.cat(pred, dim=0)[:, 0].float()  # [n_obj, h, w] low-res logits

    @staticmethod
    def _merged_output_dict(state, members: Sequence[int]) -> dict:
        """The output dict of a batch of objects: per stored frame, the objects' memory features and object
        pointers concatenated along the batch (what `_prepare_memory_conditioned_features` reads). Merges are
        cached in the state, keyed by frame, and reused while every object's stored output is the same object
        (a correction replaces it -> merged again)."""
        torch = _torch()
        cache = state.setdefault("merged_outputs", {})
        merged = {}
        for storage in ("cond_frame_outputs", "non_cond_frame_outputs"):
            merged[storage] = {}
            for frame in state["output_dict_per_obj"][members[0]][storage]:
                parts = tuple(state["output_dict_per_obj"][i][storage][frame] for i in members)
                key = (storage, frame, tuple(members))
                hit = cache.get(key)
                if hit is None or len(hit[0]) != len(parts) or any(a is not b for a, b in zip(hit[0], parts)):
                    pos = parts[0]["maskmem_pos_enc"]
                    value = {
                        "maskmem_features": torch.cat([p["maskmem_features"] for p in parts], dim=0),
                        "maskmem_pos_enc": None if pos is None else [x.expand(len(parts), -1, -1, -1) for x in pos],
                        "obj_ptr": torch.cat([p["obj_ptr"] for p in parts], dim=0),
                    }
                    hit = (parts, value)
                    cache[key] = hit
                merged[storage][frame] = hit[1]
        return merged

    @staticmethod
    def _start_frame(plan, target_cond_frames: Sequence[int], count: int) -> int:
        if plan.start_frame is not None:
            return int(min(max(plan.start_frame, 0), count - 1))
        if target_cond_frames:
            return int(target_cond_frames[0])
        return 0

    @staticmethod
    def _cond_selection(support_attention, offset, count, target_cond_frames):
        """video frame -> the set of conditioning video frames it attends: the support slices (video frames
        0..offset-1) `plan.support_attention` names for its target frame + every target conditioning frame.
        None when the plan names none (every frame attends every conditioning frame: sam2's own rule)."""
        if support_attention is None or offset == 0:
            return None
        targets = {offset + f for f in target_cond_frames}
        selection = {}
        for frame, supports in support_attention.items():
            frame = int(frame)
            if not 0 <= frame < count or any(not 0 <= int(s) < offset for s in supports):
                raise InputError(f"support_attention of target slice {frame} names {sorted(supports)}: the target "
                                 f"has {count} slices and the plan {offset} support slice(s)")
            selection[offset + frame] = {int(s) for s in supports} | targets
        return selection


@dataclass(eq=False)
class _Incremental:
    """What an incremental re-run needs from the previous run; one target, one plan (replaced every run).

    state: the previous run's sam2 inference state: per object and frame, the low-res logits (the frame's
    probabilities), the memory features, the object pointer, and the direction the frame was reached in
    (`frames_tracked_per_obj`). Its size is that of the state a run holds anyway (nothing extra is copied).

    Why reusing it is valid: sam2 tracks a frame from (1) every conditioning frame (support slices, the
    plan's prompts, corrected slices; here the per-frame selection), (2) the memories of the previous 6
    tracked frames and (3) the object pointers of up to 15 previous frames, "previous" meaning in the
    tracking direction, i.e. between the start frame and the frame. With the same plan (same features,
    prompts, supports, start frame) a new corrected frame c only adds a conditioning frame; the frames
    downstream of c (away from the start) are re-tracked in order, so each of them sees the kept memories of
    the unchanged frames behind c, c itself and the already re-tracked frames behind it, exactly as a
    sequential run would. Frames upstream of c and on the other side of the start keep their outputs (the
    user did not touch them; a correction never changes slices on the other side of the start), and so do the
    frames beyond the next conditioning frame, which anchors them (deliberate: a full run would let its first
    few frames also attend changed memories across it).
    """

    key: Tuple[str, str]  # (target stack fingerprint, plan fingerprint)
    objects: Tuple[int, ...]
    start: int
    corrected: Dict[int, np.ndarray]  # corrected frame -> its label slice
    state: dict

    @staticmethod
    def new_corrections(previous: Optional["_Incremental"], key, active, corrected: Dict[int, np.ndarray]):
        """The corrected frames that are new (or changed) since `previous`, or None for a full run."""
        if previous is None or previous.key != key or previous.objects != tuple(active):
            return None
        if any(frame not in corrected for frame in previous.corrected):  # a correction was removed
            return None
        return [f for f, mask in sorted(corrected.items())
                if f not in previous.corrected or not np.array_equal(previous.corrected[f], mask)]


def _plan_fingerprint(plan, support_images: Optional[np.ndarray], image_size: int) -> str:
    """Content hash of everything of a PromptPlan that a run depends on (prompts, supports, ranges, start)."""
    digest = hashlib.sha1()

    def add(*parts) -> None:
        for part in parts:
            if isinstance(part, np.ndarray):
                digest.update(f"{part.dtype}{part.shape}".encode())
                digest.update(np.ascontiguousarray(part).tobytes())
            else:
                digest.update(repr(part).encode())

    add(image_size, plan.labels, plan.start_frame)
    if plan.support_attention is not None:
        add("attention", sorted((int(f), tuple(int(s) for s in supports))
                                for f, supports in plan.support_attention.items()))
    for value in plan.labels:
        prompt = plan.objects[value]
        add("object", value)
        for frame in sorted(prompt.masks or {}):
            add("mask", int(frame), np.asarray(prompt.masks[frame], dtype=bool))
        for frame in sorted(prompt.boxes or {}):
            box = prompt.boxes[frame]
            add("box", int(frame), None if box is None else np.asarray(box, dtype=np.float64))
        for frame in sorted(prompt.points or {}):
            coords, point_labels = prompt.points[frame]
            add("points", int(frame), np.asarray(coords, dtype=np.float64), np.asarray(point_labels, dtype=np.int64))
        for frame in sorted(prompt.embeddings or {}):
            embedding = prompt.embeddings[frame]
            add("embedding", int(frame), embedding.sparse_tokens_t256,
                "no dense" if embedding.dense_256hw is None else embedding.dense_256hw)
    if support_images is not None:
        add("support", support_images)
        for slice_ in plan.support:
            for value in sorted(slice_.masks):
                add(value, np.asarray(slice_.masks[value], dtype=bool))
    return digest.hexdigest()


def _fit(image: np.ndarray, height: int, width: int, order: int = 1) -> np.ndarray:
    """Resize a 2D array to height x width (bilinear for images, nearest for masks); no-op if it fits."""
    if image.shape == (height, width):
        return image
    torch = _torch()
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    mode = "bilinear" if order == 1 else "nearest"
    kwargs = {"align_corners": False} if order == 1 else {}
    return F.interpolate(x, size=(height, width), mode=mode, **kwargs)[0, 0].numpy().astype(image.dtype)


def _sigmoid_at(logits, height: int, width: int) -> np.ndarray:
    """[h, w] low-res logits -> [H, W] float32 probabilities at the frame's original size."""
    torch = _torch()
    import torch.nn.functional as F

    x = logits[None, None].float()
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(x)[0, 0].cpu().numpy().astype(np.float32)
