"""`proxy-prompt` generator: a small trained Proxy Prompt Generator turns reference image-mask pairs into prompt
embeddings for a frozen SAM-family or SAM 2 model (our reconstruction of Proxy Prompt, docs/proxy-prompt.md).

Per target slice and structure: (i) the `reference_top_k` reference slices holding the structure whose pooled image
embeddings are closest to the target slice's are selected; the network (`proxy_prompt_net.ProxyPromptNet`: selective
maps + Vision Mamba, dual-reverse cross-attention) turns them and the target's features into N sparse prompt tokens
and a dense prompt. Only the slices of each structure's registered slice range (+- `slice_range_margin`) are
prompted, and the output is bounded to it (`slice_range` 'all': every slice). A network trained with `prior_map`
'registration' (the default) also reads the structure's registration prior on the target slice as a location map. A model without memory (LiteMedSAM,
SAM ViT) decodes every prompted slice from its proxy prompt; SAM 2 gets proxy prompts on the `conditioning_frames`
slices its decoder is most confident on, and propagates from them with its memory.

Training (`proxyprompt train --generator proxy-prompt`): up to `max_masks` annotated slices are taken from the
training cases and encoded once; each step draws episodes (a target slice among them, its references among the slices
of the other cases) and minimises Dice + BCE of the frozen decoder's output, through the decoder, into the network.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..contract import ObjectPrompt, PromptEmbedding, PromptPlan, ReferenceCase
from ..errors import InputError
from ..frames import make_slice_stack
from ..options import Options, option
from ..progress import check_cancel, report
from .base import Generator, GeneratorContext, register_generator
from .checkpoints import TrainedWeights, TrainingJob, find_generator_checkpoint, load_generator_checkpoint
from .registration import RegistrationGenerator

log = logging.getLogger("proxyprompt")

# 16 ACDC masks with litemedsam, 1 torch thread: 434 s of CPU time in all (encoding included), 29 min wall on the
# shared 2-core machine at load 9-14 (docs/benchmarks.md, "proxy-prompt"); idle, the wall time is about the CPU time
DEFAULT_STEPS = 300
EPISODES_PER_STEP = 1
LEARNING_RATE = 1e-3
RING_CELLS = 3  # background ring: the structure's mask dilated by this many feature cells, minus the structure
DECODER_SCALE = 4  # the mask decoders' low-resolution logits are 4 x the feature grid


@dataclass(frozen=True)
class ProxyPromptOptions(Options):
    generator_checkpoint: Optional[str] = option(
        None, "trained generator weights (`proxyprompt train`); default: the registered ones for the model", str)
    reference_top_k: int = option(4, "proxy-prompt: reference slices selected per target slice (pooled-embedding "
                                     "similarity)", int, minimum=1)
    conditioning_frames: int = option(1, "proxy-prompt, SAM 2: target slices given proxy prompts before memory "
                                         "propagation", int, minimum=1)
    max_reference_slices: int = option(24, "proxy-prompt: most reference slices encoded per reference case", int,
                                       minimum=1)
    slice_range: str = option("registration", "proxy-prompt: target slices given proxy prompts per structure: "
                                              "'registration' (the slices the registered reference label spans, "
                                              "widened by --slice-range-margin) or 'all'", str,
                              choices=("registration", "all"))
    slice_range_margin: int = option(1, "proxy-prompt: slices added on each side of the registered slice range",
                                     int, minimum=0)
    prior_map: str = option("registration", "proxy-prompt training: 'registration' trains a network that also reads "
                                            "each structure's registration prior on the target slice (registered "
                                            "from the other training cases' chosen slices); 'none' one that does "
                                            "not. At inference the checkpoint says which", str,
                            choices=("registration", "none"))


# ---------------------------------------------------------------- slices on the feature grid
@dataclass(eq=False)
class EncodedSlices:
    """Slices of one case on the model's feature grid: features [n, C, h, w] (torch), pooled [n, C] (unit),
    per label: mask fraction per cell [n, h, w], background ring [n, h, w], mask on the decoder's logit grid
    [n, 4h, 4w]; `valid_fine` [4h, 4w] cells covering the frame; `grid`: the FeatureGrid; `entry`: the model's
    feature-cache entry."""

    features: object
    pooled: object
    masks: Dict[int, object]
    rings: Dict[int, object]
    fine: Dict[int, object]
    valid_fine: object
    grid: object = None
    entry: object = None


def _ring(mask_nhw, valid_hw):
    import torch.nn.functional as F

    grown = F.max_pool2d((mask_nhw > 0)[:, None].float(), 2 * RING_CELLS + 1, stride=1, padding=RING_CELLS)[:, 0]
    return (grown * (1.0 - mask_nhw) * valid_hw[None]).clamp(0, 1)


def encode_slices(model, stack, indices: Sequence[int], labels: Sequence[int], label_stack: Optional[np.ndarray],
                  target: bool = False, progress=None, cancel=None) -> EncodedSlices:
    """Features (and per-label masks from `label_stack` [N, H, W]) of `indices` of a SliceStack. target=True: the
    features come from (and stay in) the model's cache; otherwise the target's cached features are left in place."""
    import torch

    sub = replace(stack, images=np.ascontiguousarray(stack.images[list(indices)])) if indices is not None else stack
    get = model.pixel_features if target else model.other_pixel_features
    pixel = get(sub, progress=progress, cancel=cancel)
    features = torch.from_numpy(pixel.features_nchw)
    grid = pixel.grid
    valid = torch.zeros(grid.shape)
    valid[:grid.valid[0], :grid.valid[1]] = 1.0
    pooled = (features * valid).sum((2, 3)) / valid.sum()
    pooled = torch.nn.functional.normalize(pooled, dim=1)
    fine_grid = grid.refined(DECODER_SCALE)
    valid_fine = torch.zeros(fine_grid.shape)
    valid_fine[:fine_grid.valid[0], :fine_grid.valid[1]] = 1.0
    masks, rings, fine = {}, {}, {}
    if label_stack is not None:
        chosen = label_stack[list(indices)] if indices is not None else label_stack
        for value in labels:
            binary = chosen == value
            masks[value] = torch.from_numpy(np.stack([grid.mask_to_grid(m) for m in binary]))
            rings[value] = _ring(masks[value], valid)
            fine[value] = torch.from_numpy(np.stack([fine_grid.mask_to_grid(m) for m in binary]))
    return EncodedSlices(features, pooled, masks, rings, fine, valid_fine, grid)


def prior_on_grid(grid, prior_nhw: np.ndarray):
    """A soft prior [n, H, W] on the frames -> [n, h, w] float32 torch on the feature grid (fraction by area)."""
    import torch

    return torch.from_numpy(np.stack([grid.mask_to_grid(np.asarray(p, dtype=np.float32)) for p in prior_nhw]))


def registration_priors(target: ReferenceCase, target_stack, references: Sequence[ReferenceCase], labels,
                        model, cancel=None) -> Dict[int, np.ndarray]:
    """label -> [N, H, W] float32: the registration generator's prior of `target` from `references` (what
    inference gets from its reference case), on the target's frames."""
    context = GeneratorContext(list(references), target.image, target_stack, list(labels), model, cancel=cancel)
    plan = RegistrationGenerator.plan_with_method(context, None)
    shape = target_stack.images.shape
    return {value: (np.asarray(plan.objects[value].prior, dtype=np.float32)
                    if value in plan.objects and plan.objects[value].prior is not None
                    else np.zeros(shape, np.float32)) for value in labels}


def chosen_slices_only(reference: ReferenceCase, stack, slices: Sequence[int]) -> ReferenceCase:
    """The case as a sparse reference that holds only `slices` (stack indices) annotated: training registers the
    other cases' chosen masks and nothing more, so the network is trained on `max_masks` masks in all."""
    labels = stack.labels(reference.label)
    keep = np.zeros(labels.shape[0], dtype=bool)
    keep[list(slices)] = True
    masked = np.where(keep[:, None, None], labels, 0).astype(labels.dtype)
    return replace(reference, label=stack.to_volume(masked), annotated_slices=tuple(int(n) for n in sorted(slices)))


def select_references(target_pooled, candidates_pooled, top_k: int):
    """CSM (i): indices of the `top_k` candidates whose pooled embeddings are most similar (cosine) to the target."""
    import torch

    similarity = candidates_pooled @ target_pooled
    return torch.topk(similarity, min(int(top_k), int(similarity.shape[0]))).indices


def choose_training_slices(label_stacks: Sequence[np.ndarray], max_masks: int) -> List[Tuple[int, int]]:
    """(case, slice) pairs: up to `max_masks` annotated slices (holding any label), shared out over the cases as
    evenly as they allow, evenly spaced within each case."""
    annotated = [list(np.flatnonzero(stack.reshape(stack.shape[0], -1).any(axis=1))) for stack in label_stacks]
    quota = [0] * len(annotated)
    remaining = min(int(max_masks), sum(len(a) for a in annotated))
    while remaining:
        for case, slices in enumerate(annotated):
            if remaining and quota[case] < len(slices):
                quota[case] += 1
                remaining -= 1
    chosen = []
    for case, (slices, count) in enumerate(zip(annotated, quota)):
        if count:
            positions = np.linspace(0, len(slices) - 1, count).round().astype(int)
            chosen += [(case, int(slices[p])) for p in sorted(set(positions))]
    return chosen


def _dice_bce(logits_b1hw, target_bhw, valid_hw):
    import torch
    import torch.nn.functional as F

    logits = logits_b1hw[:, 0].float()
    bce = F.binary_cross_entropy_with_logits(logits, target_bhw, reduction="none")
    bce = (bce * valid_hw).sum((1, 2)) / valid_hw.sum()
    probability = torch.sigmoid(logits) * valid_hw
    dice = 1 - (2 * (probability * target_bhw).sum((1, 2)) + 1) / (probability.sum((1, 2)) + target_bhw.sum((1, 2)) + 1)
    return (bce + dice).mean()


_NETS: Dict[tuple, object] = {}  # (path, mtime, size) -> (meta, net): a checkpoint is read once per process


@register_generator
class ProxyPromptGenerator(Generator):
    name = "proxy-prompt"
    description = "Proxy Prompt: a trained prompt generator turns the reference into prompt embeddings"
    needs_model = True
    needs_training = True
    Options = ProxyPromptOptions

    # ---------------------------------------------------------------- weights
    @staticmethod
    def _net_from_tensors(tensors):
        from .proxy_prompt_net import NetConfig, ProxyPromptNet

        net = ProxyPromptNet(NetConfig.from_tensors(tensors))
        state = {name[len("net."):]: value for name, value in tensors.items() if name.startswith("net.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"proxy-prompt weights do not fit this engine's network ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors)")
        return net

    def _load(self, options: ProxyPromptOptions, model):
        path = options.generator_checkpoint or find_generator_checkpoint(self.name, model)
        if path is None:
            raise InputError(
                f"generator '{self.name}' has no trained weights for model '{model.name}': train them with "
                f"`proxyprompt train --generator {self.name} --model {model.name} --image ... --label ... --output "
                f"ppg.pt` and pass --generator-checkpoint ppg.pt")
        from pathlib import Path

        stat = Path(path).stat() if Path(path).is_file() else None
        key = (str(path), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
        meta, tensors = load_generator_checkpoint(path, self.name, model)  # refuses another model / size
        if key not in _NETS:
            _NETS.clear()
            _NETS[key] = self._net_from_tensors(tensors).to(model.device).eval()
        return meta, _NETS[key], str(path)

    # ---------------------------------------------------------------- inference
    def plan(self, context) -> PromptPlan:
        import torch

        options = self.options_of(context)
        model = context.model
        meta, net, path = self._load(options, model)
        frames = context.target_frames
        target = encode_slices(model, frames, None, [], None, target=True, progress=context.progress,
                               cancel=context.cancel)
        references = self._reference_slices(context, options)
        objects: Dict[int, ObjectPrompt] = {}
        notes = [f"proxy-prompt: weights {path} (trained on {meta.num_masks} masks for {meta.model})"]
        reads_prior = bool(net.config.prior_map)
        prior = None
        if options.slice_range == "registration" or reads_prior:
            prior = RegistrationGenerator.plan_with_method(context, None)
        ranges = self._slice_ranges(context, options, notes, prior)
        if reads_prior:
            notes.append("proxy-prompt: the network reads each structure's registration prior")
        total = frames.num_slices * len(context.labels)
        report(context.progress, "proxy-prompt", 0, total)
        done = 0
        for value in context.labels:
            candidates = [(case, i) for case, encoded in enumerate(references)
                          for i in range(encoded.features.shape[0]) if float(encoded.masks[value][i].sum()) > 0]
            if not candidates:
                notes.append(f"proxy-prompt: no reference slice holds label {value}")
                objects[value] = ObjectPrompt(value)
                done += frames.num_slices
                continue
            pooled = torch.stack([references[c].pooled[i] for c, i in candidates])
            embeddings: Dict[int, PromptEmbedding] = {}
            prior_maps = None
            if reads_prior and value in prior.objects and prior.objects[value].prior is not None:
                prior_maps = prior_on_grid(target.grid, prior.objects[value].prior)
            first, last = ranges.get(value) or (0, frames.num_slices - 1)
            for frame in range(frames.num_slices):
                check_cancel(context.cancel)
                if not first <= frame <= last:
                    done += 1
                    continue
                chosen = [candidates[j] for j in select_references(target.pooled[frame], pooled,
                                                                   options.reference_top_k).tolist()]
                with torch.no_grad():
                    sparse, dense = self._forward(net, target.features[frame], references, chosen, value, model,
                                                  None if prior_maps is None else prior_maps[frame])
                embeddings[frame] = PromptEmbedding(sparse.float().cpu().numpy(),
                                                    None if dense is None else dense.float().cpu().numpy())
                done += 1
                report(context.progress, "proxy-prompt", done, total)
            if model.capabilities.memory:
                embeddings = self._conditioning(model, frames, embeddings, options.conditioning_frames)
            objects[value] = ObjectPrompt(value, embeddings=embeddings, frame_range=ranges.get(value))
        return PromptPlan(objects, notes=notes)

    @staticmethod
    def _slice_ranges(context, options, notes: List[str], prior: Optional[PromptPlan]) -> Dict[int, Tuple[int, int]]:
        """label -> (first, last) target slice given proxy prompts (and bounding the output): with slice_range
        'registration', the slices the registration generator's prior spans, widened by slice_range_margin; a
        structure the prior misses keeps every slice. Why: a model without memory decodes every prompted slice, and
        on slices without the structure the network still finds look-alike tissue (measured on the hippocampus:
        false positives on every slice outside the structure's extent, the anterior/posterior split being a
        position along the slice axis more than an edge), while the registration's 3D search places a structure's
        extent well (registration alone: 0.79 mean Dice on the hippocampus)."""
        if options.slice_range == "all" or prior is None:
            return {}
        last_frame = context.target_frames.num_slices - 1
        ranges = {}
        for value in context.labels:
            span = prior.objects[value].frame_range if value in prior.objects else None
            if span is None:
                notes.append(f"proxy-prompt: the registration prior misses label {value}: every slice prompted")
                continue
            margin = options.slice_range_margin
            ranges[value] = (max(0, span[0] - margin), min(last_frame, span[1] + margin))
        notes.append("proxy-prompt: slice ranges from the registration prior (+-" + str(options.slice_range_margin)
                     + "): " + ", ".join(f"{v}: {a}-{b}" for v, (a, b) in ranges.items()))
        return ranges

    @staticmethod
    def _forward(net, target_chw, references, chosen, value: int, model, prior_hw=None):
        """The network on one target slice for one label; `references[case]` are EncodedSlices, `chosen` (case,
        row) pairs; `prior_hw` the structure's prior on the target's feature grid (read by a `prior_map` net)."""
        device = model.device
        features = [references[c].features[i] for c, i in chosen]
        import torch

        return net(target_chw.to(device), torch.stack(features).to(device),
                   torch.stack([references[c].masks[value][i] for c, i in chosen]).to(device),
                   torch.stack([references[c].rings[value][i] for c, i in chosen]).to(device),
                   None if prior_hw is None else prior_hw.to(device))

    def _reference_slices(self, context, options) -> List[EncodedSlices]:
        """Each reference case's slices holding any requested label (at most `max_reference_slices`, evenly spaced;
        a sparse reference: its annotated slices), encoded without evicting the target's features."""
        encoded = []
        for reference in context.references:
            stack = make_slice_stack(reference.image)
            labels = stack.labels(reference.label)
            holding = np.flatnonzero(np.isin(labels, context.labels).reshape(labels.shape[0], -1).any(axis=1))
            if reference.annotated_slices is not None:  # a sparse reference: only its annotated slices are known
                holding = np.array([n for n in holding if n in set(reference.annotated_slices)], dtype=int)
            if holding.size == 0:
                continue
            if holding.size > options.max_reference_slices:
                positions = np.linspace(0, holding.size - 1, options.max_reference_slices).round().astype(int)
                holding = holding[np.unique(positions)]
            encoded.append(encode_slices(context.model, stack, [int(n) for n in holding], context.labels,
                                         labels, cancel=context.cancel))
        if not encoded:
            raise InputError("proxy-prompt: no reference slice holds the requested labels")
        return encoded

    @staticmethod
    def _conditioning(model, frames, embeddings: Dict[int, PromptEmbedding], count: int):
        """SAM 2: the `count` frames whose proxy prompt the decoder is most confident about (IoU score of a non-empty
        mask) keep their embeddings; memory propagation does the rest."""
        import torch

        entry = model.features(frames)
        scores = {}
        with torch.no_grad():
            for frame, embedding in embeddings.items():
                sparse = torch.from_numpy(embedding.sparse_tokens_t256)[None].to(model.device)
                dense = None if embedding.dense_256hw is None else \
                    torch.from_numpy(embedding.dense_256hw)[None].to(model.device)
                logits, iou = model.decode_prompt_embeddings(entry, frame, sparse, dense)
                scores[frame] = float(iou[0]) if bool((logits > 0).any()) else -1.0
        best = sorted(scores, key=lambda f: (-scores[f], f))[:count]
        return {frame: embeddings[frame] for frame in sorted(best)}

    # ---------------------------------------------------------------- training
    def train(self, references, model, options, progress=None, cancel=None, job: Optional[TrainingJob] = None):
        import torch

        from ..models.base import autocast
        from .proxy_prompt_net import NetConfig, ProxyPromptNet

        job = job or TrainingJob()
        settings = job.options
        steps_total = settings.steps or DEFAULT_STEPS
        torch.manual_seed(settings.seed)
        rng = np.random.default_rng(settings.seed)
        stacks = [make_slice_stack(reference.image) for reference in references]
        label_stacks = [stack.labels(reference.label) for stack, reference in zip(stacks, references)]
        labels = sorted({int(v) for stack in label_stacks for v in np.unique(stack) if v})
        chosen = choose_training_slices(label_stacks, settings.max_masks)
        if len(chosen) < 2:
            raise InputError(f"proxy-prompt training needs at least 2 annotated slices, the cases give {len(chosen)}")
        cases: Dict[int, EncodedSlices] = {}
        slot: Dict[Tuple[int, int], int] = {}
        report(progress, "encode", 0, len(chosen))
        for case in sorted({c for c, _ in chosen}):
            indices = [i for c, i in chosen if c == case]
            cases[case] = encode_slices(model, stacks[case], indices, labels, label_stacks[case], target=True,
                                        cancel=cancel)
            cases[case].entry = model.features(replace(stacks[case], images=np.ascontiguousarray(
                stacks[case].images[indices])))  # the cache entry the decoder reads (no second encoding)
            slot.update({(case, i): row for row, i in enumerate(indices)})
            report(progress, "encode", sum(1 for c, _ in chosen if c <= case), len(chosen))

        options = self.Options.parse(options, f"generator '{self.name}'")
        if job.resume is not None:
            net = self._net_from_tensors(job.resume)
        else:
            net = ProxyPromptNet(NetConfig(prior_map=options.prior_map == "registration" and len(cases) > 1))
        # (target case, prior case) -> label -> [chosen slices of the target case, h, w]: the registration prior of
        # the target case's chosen slices from the other case's chosen slices
        priors: Dict[Tuple[int, int], Dict[int, object]] = {}
        if net.config.prior_map:
            sparse_cases = {case: chosen_slices_only(references[case], stacks[case],
                                                     [i for c, i in chosen if c == case]) for case in cases}
            for case in cases:
                rows = [i for c, i in chosen if c == case]
                for other in cases:
                    if other == case:
                        continue
                    check_cancel(cancel)
                    registered = registration_priors(references[case], stacks[case], [sparse_cases[other]], labels,
                                                     model, cancel)
                    priors[(case, other)] = {v: prior_on_grid(cases[case].grid, registered[v][rows])
                                             for v in labels}
                report(progress, "register", len(priors), len(cases) * (len(cases) - 1))
        net = net.to(model.device).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
        start = 0
        if job.resume is not None:
            start = int(job.resume.get("training.step", torch.tensor(0)).item())
            _load_optimizer(optimizer, net, job.resume)

        multi_case = len(cases) > 1
        report(progress, "train", start, steps_total)
        started = time.perf_counter()
        for step in range(start, steps_total):
            check_cancel(cancel)
            # cosine decay written per step (not an LR scheduler): a resumed run starts at its step's rate
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * min(step, steps_total) / steps_total))
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for _ in range(EPISODES_PER_STEP):
                case, index = chosen[int(rng.integers(len(chosen)))]
                pool = [(c, i) for c, i in chosen if (c != case if multi_case else i != index)]
                present = [v for v in labels if any(float(cases[c].masks[v][slot[(c, i)]].sum()) > 0 for c, i in pool)]
                if not present:
                    continue
                row = slot[(case, index)]
                target = cases[case]
                prior_case = None
                if priors:  # the prior of one other case, as inference gets it from its one reference
                    others = sorted({c for c, _ in pool})
                    prior_case = others[int(rng.integers(len(others)))]
                with autocast(model.device, job.precision):
                    sparse, dense = [], []
                    for value in present:
                        candidates = [(c, slot[(c, i)]) for c, i in pool
                                      if float(cases[c].masks[value][slot[(c, i)]].sum()) > 0]
                        pooled = torch.stack([cases[c].pooled[r] for c, r in candidates])
                        picked = [candidates[j] for j in select_references(target.pooled[row], pooled,
                                                                           int(rng.integers(1, 5))).tolist()]
                        prior_hw = None if prior_case is None else priors[(case, prior_case)][value][row]
                        s, d = self._forward(net, target.features[row], cases, picked, value, model, prior_hw)
                        sparse.append(s)
                        dense.append(d)
                    dense_b = None if dense[0] is None else torch.stack(dense)
                    logits, _ = model.decode_prompt_embeddings(target.entry, row, torch.stack(sparse), dense_b)
                truth = torch.stack([target.fine[v][row] for v in present]).to(logits.device)
                losses.append(_dice_bce(logits, truth, target.valid_fine.to(logits.device)))
            if not losses:
                continue
            loss = torch.stack(losses).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            if job.log is not None:
                job.log({"step": step + 1, "loss": round(float(loss.detach()), 6),
                         "seconds": round(time.perf_counter() - started, 3)})
            report(progress, "train", step + 1, steps_total, f"loss {float(loss.detach()):.4f}")

        tensors = {f"net.{name}": value.detach().cpu() for name, value in net.state_dict().items()}
        tensors.update(net.config.to_tensors())
        tensors.update(_optimizer_tensors(optimizer, net))
        tensors["training.step"] = torch.tensor(steps_total)
        return TrainedWeights(tensors, num_masks=len(chosen))


def _optimizer_tensors(optimizer, net) -> dict:
    """AdamW's moments by parameter name (plain tensors: the checkpoint stays `weights_only`-readable)."""
    tensors = {}
    for name, parameter in net.named_parameters():
        state = optimizer.state.get(parameter)
        if state:
            tensors[f"optimizer.exp_avg.{name}"] = state["exp_avg"].detach().cpu()
            tensors[f"optimizer.exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().cpu()
            tensors[f"optimizer.step.{name}"] = state["step"].detach().cpu().reshape(())
    return tensors


def _load_optimizer(optimizer, net, tensors) -> None:
    for name, parameter in net.named_parameters():
        key = f"optimizer.exp_avg.{name}"
        if key in tensors:
            optimizer.state[parameter] = {
                "step": tensors[f"optimizer.step.{name}"].clone().float(),
                "exp_avg": tensors[key].clone().to(parameter.device),
                "exp_avg_sq": tensors[f"optimizer.exp_avg_sq.{name}"].clone().to(parameter.device),
            }
