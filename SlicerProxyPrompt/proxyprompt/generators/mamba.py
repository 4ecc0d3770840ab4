"""A Vision Mamba block (bidirectional selective state-space scan) for the proxy-prompt generator.

The selective scan is Mamba's (Gu & Dao 2023): per channel d and state n,
    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t[d],   y_t[d] = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]
(then y *= silu(z) when a gate z is given), with the tensor layout of `mamba_ssm.ops.selective_scan_interface.
selective_scan_fn`: u, delta, z [b, d, l]; A [d, n]; B, C [b, n, l]; D [d]. On CUDA, when `mamba-ssm` imports, its
kernel runs; everywhere else `selective_scan` computes the same recurrence in chunks (inside a chunk in closed
form, exp of partial sums of delta * A, which are <= 0 so nothing overflows; chunk to chunk by the carried state).
`selective_scan_loop` is the step-by-step recurrence the tests compare both against.

`VisionMambaBlock` follows Vision Mamba (Vim, Zhu et al. 2024): one input projection into (x, z), then a forward
and a backward branch, each with its own depthwise causal conv, input-dependent (delta, B, C) and scan, summed, gated
by silu(z), projected back and added to the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _mamba_ssm_scan():
    """mamba-ssm's CUDA selective scan, or None when the package (a CUDA build) is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its compiled CUDA extension
        return None
    return selective_scan_fn


def _prepare_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias.reshape(1, -1, 1)
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z):
    """The scan's output y [b, d, l] plus the skip term D * u, gated by silu(z) (as mamba-ssm's kernel does)."""
    if D is not None:
        y = y + D.float().reshape(1, -1, 1) * u
    if z is not None:
        y = y * F.silu(z.float())
    return y


def selective_scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence one step at a time (reference for tests)."""
    delta = _prepare_delta(delta.float(), delta_bias, delta_softplus)
    u, A, B, C = u.float(), A.float(), B.float(), C.float()
    batch, channels, length = u.shape
    state = u.new_zeros(batch, channels, A.shape[1])
    outputs = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A[None])  # [b, d, n]
        state = decay * state + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        outputs.append((state * C[:, None, :, t]).sum(-1))
    return _skip_and_gate(torch.stack(outputs, dim=-1), u, D, z)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           chunk: int = 8):
    """The same recurrence in pure PyTorch, `chunk` steps at a time in closed form (differentiable)."""
    delta = _prepare_delta(delta.float(), delta_bias, delta_softplus)
    u, A, B, C = u.float(), A.float(), B.float(), C.float()
    batch, channels, length = u.shape
    delta_a = delta[..., None] * A[None, :, None, :]  # [b, d, l, n], <= 0 for A < 0
    delta_b_u = delta[..., None] * B.transpose(1, 2)[:, None] * u[..., None]  # [b, d, l, n]
    state = u.new_zeros(batch, channels, A.shape[1])
    outputs = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        steps = stop - start
        partial = torch.cumsum(delta_a[:, :, start:stop], dim=2)  # [b, d, T, n]
        # weight of input s in state t (s <= t): exp(partial_t - partial_s)
        difference = partial[:, :, :, None, :] - partial[:, :, None, :, :]  # [b, d, t, s, n]
        causal = torch.ones(steps, steps, dtype=torch.bool, device=u.device).tril()
        weights = torch.exp(difference.masked_fill(~causal[None, None, :, :, None], float("-inf")))
        states = torch.einsum("bdtsn,bdsn->bdtn", weights, delta_b_u[:, :, start:stop])
        states = states + torch.exp(partial) * state[:, :, None, :]
        outputs.append(torch.einsum("bdtn,bnt->bdt", states, C[:, :, start:stop]))
        state = states[:, :, -1]
    return _skip_and_gate(torch.cat(outputs, dim=-1), u, D, z)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's kernel on CUDA tensors when it imports, else `selective_scan_chunked`."""
    if u.is_cuda:
        kernel = _mamba_ssm_scan()
        if kernel is not None:
            return kernel(u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
                          D, z.contiguous() if z is not None else None, delta_bias, delta_softplus)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


class _ScanBranch(nn.Module):
    """One scan direction: depthwise causal conv, input-dependent (delta, B, C), selective scan."""

    def __init__(self, inner: int, state: int, conv: int, dt_rank: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(inner, inner, conv, groups=inner, padding=conv - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        self.state = state
        self.dt_rank = dt_rank
        # Mamba's initialisation: A = -(1..N) per channel (log-parametrised), dt in [1e-3, 1e-1]
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x, z):
        """x, z: [b, l, inner] -> [b, l, inner]."""
        length = x.shape[1]
        x = F.silu(self.conv(x.transpose(1, 2))[..., :length])  # [b, inner, l], causal
        parts = self.x_proj(x.transpose(1, 2))
        dt, B, C = torch.split(parts, [self.dt_rank, self.state, self.state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # bias added inside the scan (softplus)
        y = selective_scan(x, delta, -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                           self.D.float(), z.transpose(1, 2), self.dt_proj.bias.float(), True)
        return y.transpose(1, 2)


class VisionMambaBlock(nn.Module):
    """Bidirectional Mamba block over a token sequence [b, l, dim] (residual)."""

    def __init__(self, dim: int, state: int = 16, expand: int = 2, conv: int = 4) -> None:
        super().__init__()
        inner = expand * dim
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * inner)
        dt_rank = math.ceil(dim / 16)
        self.forward_branch = _ScanBranch(inner, state, conv, dt_rank)
        self.backward_branch = _ScanBranch(inner, state, conv, dt_rank)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, tokens):
        x, z = self.in_proj(self.norm(tokens)).chunk(2, dim=-1)
        forward = self.forward_branch(x, z)
        backward = self.backward_branch(x.flip(1), z.flip(1)).flip(1)
        return tokens + self.out_proj(0.5 * (forward + backward).to(tokens.dtype))
