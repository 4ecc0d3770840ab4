"""The Proxy Prompt Generator network: Contextual Selective Module (CSM) + Contextual Colorization Module (CCM).

Our reconstruction of Proxy Prompt (arXiv 2502.03501; no code is public; docs/proxy-prompt.md says what is from the
paper and what is our reading). Input: the frozen model's per-pixel features of one target slice [C, h, w] and of
K selected reference slices [K, C, h, w] with one structure's mask on the same grid ([K, h, w], fraction of each cell
covered) and a background ring around it. Output: N sparse prompt tokens [N, 256] and a dense prompt [256, h, w] for
the frozen mask decoder.

CSM (ii) selective maps: per reference, mask-weighted foreground / background prototypes; on the target, per-token
relevance maps (cosine to the prototypes and the best match among the reference's foreground / background cells);
per reference foreground cell, its relevance to the target (best cosine over target cells), which picks the
`tokens_per_reference` most relevant cells as context tokens. (iii) a bidirectional Vision Mamba block over the
selected context tokens of all references gives the contextual embedding. (Step (i), top-k reference selection by
pooled-embedding similarity, is a choice of inputs: `select_references` in generators/proxy_prompt.py.)

With `NetConfig.prior_map` (ours, not the paper's) the structure's registration prior on the target slice is a fifth
target map beside the four relevance maps: where the registered reference puts it (measured on the hippocampus: without
it, the anterior / posterior hippocampus, alike in features and told apart by position, were confused).

CCM, dual-reverse cross-attention: context -> target attention (what of the target matches the context) and a
reverse branch attending with negated similarity (what of the target least resembles it: the surroundings); their
difference, mixed back into the context, amplifies what distinguishes the object; then target -> context attention
colours the target tokens, and N learned prompt queries read the coloured context and target into sparse tokens;
the coloured target tokens give the dense prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contract import PROMPT_EMBEDDING_DIM
from .mamba import VisionMambaBlock

MATCH_CELLS = 64  # reference cells a target cell is matched against per reference (best-match maps)
MAPS = 4  # target relevance maps: cosine to fg / bg prototype, best match among fg / bg reference cells


@dataclass(frozen=True)
class NetConfig:
    feature_dim: int = 256  # the model's per-pixel feature channels
    dim: int = 64  # internal width
    heads: int = 4
    tokens_per_reference: int = 8  # most relevant foreground cells kept per reference slice
    prompt_tokens: int = 4  # N sparse prompt tokens
    mamba_state: int = 16
    dense: bool = True  # also give a dense prompt embedding
    # the registration prior of the structure on the target slice as a fifth target map (where to look); False in
    # checkpoints written before it existed, which load unchanged
    prior_map: bool = False

    @property
    def target_maps(self) -> int:
        return MAPS + int(self.prior_map)

    def to_tensors(self) -> dict:
        return {f"config.{k}": torch.tensor(int(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_tensors(cls, tensors: dict) -> "NetConfig":
        values = {}
        for name, field_type in cls.__dataclass_fields__.items():
            key = f"config.{name}"
            if key in tensors:
                value = int(tensors[key].item())
                values[name] = bool(value) if field_type.type in (bool, "bool") else value
        return cls(**values)


class _Attention(nn.Module):
    """Multi-head cross-attention; `reverse` attends with the negated similarity (softmax(-q.k))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries, keys, reverse: bool = False):
        """queries [b, q, dim], keys [b, k, dim] -> queries + attended [b, q, dim]."""
        b, nq, dim = queries.shape
        nk = keys.shape[1]
        head = dim // self.heads
        q = self.q(queries).reshape(b, nq, self.heads, head).transpose(1, 2)
        k = self.k(keys).reshape(b, nk, self.heads, head).transpose(1, 2)
        v = self.v(keys).reshape(b, nk, self.heads, head).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / head ** 0.5
        weights = torch.softmax(-logits if reverse else logits, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(b, nq, dim)
        return self.norm(queries + self.out(attended))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _strided(rows, count: int):
    """At most `count` rows, evenly strided (bounds the cost of best-match maps on large structures)."""
    if rows.shape[0] <= count:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, count, device=rows.device).round().long()]


def _normalise(x, dim=-1):
    return F.normalize(x, dim=dim, eps=1e-6)


class ProxyPromptNet(nn.Module):
    def __init__(self, config: NetConfig = NetConfig()) -> None:
        super().__init__()
        self.config = config
        c, d = config.feature_dim, config.dim
        # CSM
        self.token_norm = nn.LayerNorm(c)
        self.token_proj = nn.Linear(c, d)
        self.kind_embed = nn.Parameter(torch.randn(3, d) * 0.02)  # fg prototype, bg prototype, fg cell
        self.relevance_embed = nn.Linear(1, d)
        self.mamba = VisionMambaBlock(d, state=config.mamba_state)
        # CCM
        self.target_in = nn.Sequential(nn.Conv2d(c + config.target_maps, d, 1), nn.GELU(), nn.Conv2d(d, d, 3, padding=1, groups=d))
        self.context_to_target = _Attention(d, config.heads)
        self.reverse_context_to_target = _Attention(d, config.heads)
        self.distinct = _Mlp(2 * d, 2 * d, d)
        self.distinct_norm = nn.LayerNorm(d)
        self.target_to_context = _Attention(d, config.heads)
        self.target_mlp = _Mlp(d, 2 * d)
        self.target_norm = nn.LayerNorm(d)
        self.queries = nn.Parameter(torch.randn(config.prompt_tokens, d) * 0.02)
        self.query_to_context = _Attention(d, config.heads)
        self.query_to_target = _Attention(d, config.heads)
        self.sparse_out = _Mlp(d, 2 * d, PROMPT_EMBEDDING_DIM)
        if config.dense:
            self.dense_out = nn.Sequential(nn.Conv2d(d + config.target_maps, d, 1), nn.GELU(), nn.Conv2d(d, PROMPT_EMBEDDING_DIM, 1))

    # ---------------------------------------------------------------- CSM
    def selective_maps(self, target_chw, reference_kchw, foreground_khw, background_khw):
        """(target relevance maps [MAPS, h, w], context tokens [L, feature_dim], their kind [L] (0 fg prototype,
        1 bg prototype, 2 fg cell) and relevance [L])."""
        c, h, w = target_chw.shape
        k = reference_kchw.shape[0]
        target = _normalise(target_chw.reshape(c, h * w).t())  # [hw, c]
        references = reference_kchw.reshape(k, c, h * w).transpose(1, 2)  # [k, hw, c]
        fg = foreground_khw.reshape(k, h * w)
        bg = background_khw.reshape(k, h * w)
        proto_fg = torch.einsum("kn,knc->kc", fg, references) / fg.sum(1, keepdim=True).clamp_min(1e-6)  # [k, c]
        proto_bg = torch.einsum("kn,knc->kc", bg, references) / bg.sum(1, keepdim=True).clamp_min(1e-6)
        sim_fg = target @ _normalise(proto_fg).t()  # [hw, k]
        sim_bg = target @ _normalise(proto_bg).t()
        best_fg, best_bg = [], []
        tokens, kinds, relevance = [], [], []
        for index in range(k):
            fg_cells = _normalise(references[index][fg[index] > 0.5])
            if fg_cells.shape[0] == 0:  # a structure thinner than a cell: its weighted cells
                fg_cells = _normalise(references[index][fg[index] > 0])
            bg_cells = _normalise(_strided(references[index][bg[index] > 0.5], MATCH_CELLS))
            sim_cells = target @ fg_cells.t()  # [hw, n_fg]
            best_fg.append(_strided(sim_cells.t(), MATCH_CELLS).t().max(dim=1).values if fg_cells.shape[0]
                           else sim_fg[:, index])
            best_bg.append((target @ bg_cells.t()).max(dim=1).values if bg_cells.shape[0] else sim_bg[:, index])
            cells = references[index][fg[index] > 0.5] if (fg[index] > 0.5).any() else references[index][fg[index] > 0]
            # relevance of each reference foreground cell to the target: its best cosine over the target cells
            cell_relevance = sim_cells.max(dim=0).values if fg_cells.shape[0] else torch.zeros(0, device=target.device)
            keep = torch.topk(cell_relevance, min(self.config.tokens_per_reference, cell_relevance.shape[0])).indices
            ordered = keep.sort().values  # keep the reference's own raster order for the scan
            tokens += [proto_fg[index:index + 1], proto_bg[index:index + 1], cells[ordered]]
            kinds += [0, 1] + [2] * int(ordered.shape[0])
            relevance += [sim_fg[:, index].max().reshape(1), sim_bg[:, index].max().reshape(1), cell_relevance[ordered]]
        maps = torch.stack([sim_fg.mean(1), sim_bg.mean(1), torch.stack(best_fg, 1).mean(1),
                            torch.stack(best_bg, 1).mean(1)]).reshape(MAPS, h, w)
        return (maps, torch.cat(tokens), torch.tensor(kinds, device=target.device), torch.cat(relevance))

    def contextual_embedding(self, tokens_lc, kinds_l, relevance_l):
        """CSM (iii): the Vision Mamba block over the selected context tokens -> [1, L, dim]."""
        x = self.token_proj(self.token_norm(tokens_lc)) + self.kind_embed[kinds_l] + \
            self.relevance_embed(relevance_l[:, None])
        return self.mamba(x[None])

    # ---------------------------------------------------------------- CCM
    def forward(self, target_chw, reference_kchw, foreground_khw, background_khw, prior_hw=None):
        """-> (sparse tokens [N, 256], dense [256, h, w] or None). `prior_hw`: the structure's registration prior on
        the target slice, on the feature grid (fraction of each cell; read only when `config.prior_map`; None:
        zeros, no prior)."""
        maps, tokens, kinds, relevance = self.selective_maps(target_chw, reference_kchw, foreground_khw,
                                                             background_khw)
        if self.config.prior_map:
            prior = torch.zeros_like(maps[0]) if prior_hw is None else prior_hw.to(maps.dtype).reshape(maps[0].shape)
            maps = torch.cat([maps, prior[None]])
        context = self.contextual_embedding(tokens, kinds, relevance)  # [1, L, d]
        c, h, w = target_chw.shape
        target_map = self.target_in(torch.cat([target_chw, maps])[None])  # [1, d, h, w]
        target = target_map.flatten(2).transpose(1, 2)  # [1, hw, d]
        matched = self.context_to_target(context, target)
        surroundings = self.reverse_context_to_target(context, target, reverse=True)
        context = self.distinct_norm(context + self.distinct(torch.cat([matched, matched - surroundings], -1)))
        target = self.target_to_context(target, context)
        target = self.target_norm(target + self.target_mlp(target))
        queries = self.query_to_context(self.queries[None], context)
        queries = self.query_to_target(queries, target)
        sparse = self.sparse_out(queries)[0]
        dense = None
        if self.config.dense:
            coloured = target.transpose(1, 2).reshape(1, -1, h, w)
            dense = self.dense_out(torch.cat([coloured, maps[None]], 1))[0]
        return sparse, dense
