"""The learned warp of Med-PerSAM (our reconstruction, ../shared/docs/REFERENCES.md 3.8): a small CNN predicting a
dense 2D displacement field per slice pair, fitted per target at test time (no training data, no SAM training).

Input: the target frames and the reference frames already aligned on the target's grid by a linear registration
(`generators.warp`), [N, H, W] each. The warping model sees each (target, reference) slice pair at a reduced
resolution (`resolution` px on the longer side); its displacement (rows, cols, pixels) is a coarse per-slice field
(one learnable vector per `control_spacing` px, bilinearly upsampled) plus what the CNN predicts from the pair, then
upsampled to the frame. Measured on a synthetic smooth field (Testing/test_learned_warp.py): the CNN alone, zero-
initialised, needed far more than 150 steps to move pixels (gradients reach its inner layers only once its output
layer has grown), and local NCC had flat-region degeneracies; the coarse field converges in ~100 steps and the CNN
adds the detail it cannot hold. Loss = image dissimilarity of target vs warped reference (local NCC or MSE)
+ `smoothness` x mean squared displacement gradient + `consistency` x the augmentation-consistency term (the field
predicted for the left-right flipped pair must be the flipped field, its column component negated) [+ `mask_weight` x
(1 - soft Dice) between the warped reference mask and a target mask: the refit after SAM refined the mask].
Deterministic: seeded, one thread-independent CPU algorithm (no random sampling beyond the seeded flips).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .progress import check_cancel, report

LOSSES = ("ncc", "mse")


@dataclass(frozen=True)
class WarpFitSettings:
    """iterations: optimiser steps; resolution: the fitting grid's longer side (px); loss: mse (of the stacks
    standardised to zero mean, unit variance) or ncc (local, window `ncc_window` px); smoothness, consistency,
    mask_weight: loss weights; learning_rate: Adam's for the network, field_learning_rate for the coarse field (one
    value per `control_spacing` px of the fitting grid); width: channels of the network; seed: torch's seed for the
    weights and the flips."""

    iterations: int = 150
    resolution: int = 64
    loss: str = "mse"
    ncc_window: int = 9
    smoothness: float = 0.05
    consistency: float = 0.1
    mask_weight: float = 1.0
    learning_rate: float = 3e-3
    field_learning_rate: float = 0.1
    control_spacing: int = 4
    width: int = 8
    seed: int = 0


def _network(width: int, output_scale: float = 4.0):
    """A small U-Net: 2 input channels (target, reference) -> 2 output channels (displacement in pixels, predicted at
    half resolution and scaled by `output_scale` so that a few steps move it by pixels), zero-initialised output so
    the fit starts at the identity."""
    import torch
    from torch import nn

    class DisplacementNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
            self.enc1 = nn.Sequential(nn.Conv2d(2, width, 3, padding=1), act())
            self.enc2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), act())
            self.enc3 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), act(),
                                      nn.Conv2d(2 * width, 2 * width, 3, padding=1), act())
            self.dec2 = nn.Sequential(nn.Conv2d(4 * width, 2 * width, 3, padding=1), act())
            self.out = nn.Conv2d(2 * width, 2, 3, padding=1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, x):
            e1 = self.enc1(x)
            e2 = self.enc2(e1)
            e3 = self.enc3(e2)
            up = nn.functional.interpolate(e3, size=e2.shape[-2:], mode="bilinear", align_corners=False)
            half = self.out(self.dec2(torch.cat([up, e2], dim=1))) * output_scale
            # predicted at half resolution (smooth, fewer unknowns), upsampled to the fitting grid
            return nn.functional.interpolate(half, size=x.shape[-2:], mode="bilinear", align_corners=False)

    return DisplacementNet()


def warp_tensor(images, displacement, mode: str = "bilinear"):
    """images [B, C, h, w] sampled at x + displacement (displacement [B, 2, h, w]: rows, cols in pixels)."""
    import torch
    import torch.nn.functional as F

    batch, _, height, width = images.shape
    rows = torch.arange(height, dtype=images.dtype).reshape(1, height, 1)
    cols = torch.arange(width, dtype=images.dtype).reshape(1, 1, width)
    y = rows + displacement[:, 0]
    x = cols + displacement[:, 1]
    grid = torch.stack([2.0 * x / max(width - 1, 1) - 1.0, 2.0 * y / max(height - 1, 1) - 1.0], dim=-1)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=True)


def local_ncc(a, b, window: int):
    """Mean local normalised cross-correlation of [B, 1, h, w] tensors over `window` x `window` neighbourhoods."""
    import torch.nn.functional as F

    pad = window // 2
    mean = lambda t: F.avg_pool2d(t, window, stride=1, padding=pad, count_include_pad=False)  # noqa: E731
    mu_a, mu_b = mean(a), mean(b)
    cov = mean(a * b) - mu_a * mu_b
    var_a = (mean(a * a) - mu_a * mu_a).clamp(min=0)
    var_b = (mean(b * b) - mu_b * mu_b).clamp(min=0)
    return (cov * cov / (var_a * var_b + 1e-5)).mean()


def dissimilarity(fixed, warped, settings: WarpFitSettings):
    """The image term of the loss (lower is better): 1 - local NCC, or the mean squared difference."""
    if settings.loss == "mse":
        return ((fixed - warped) ** 2).mean()
    return 1.0 - local_ncc(fixed, warped, settings.ncc_window)


def _smoothness(displacement):
    dy = displacement[:, :, 1:, :] - displacement[:, :, :-1, :]
    dx = displacement[:, :, :, 1:] - displacement[:, :, :, :-1]
    return (dy * dy).mean() + (dx * dx).mean()


def _standardised(stack):
    """Zero mean, unit variance over the stack (so the MSE term has one scale whatever the intensities)."""
    return (stack - stack.mean()) / stack.std().clamp(min=1e-6)


def _flip_field(displacement, dims):
    """The displacement field of the flipped pair: flipped, and its component along the flipped axis negated."""
    import torch

    sign = torch.tensor([1.0, -1.0] if dims == [3] else [-1.0, 1.0]).reshape(1, 2, 1, 1)
    return torch.flip(displacement, dims) * sign


def _fit_grid(height: int, width: int, resolution: int):
    scale = min(1.0, resolution / max(height, width))
    return max(8, int(round(height * scale))), max(8, int(round(width * scale)))


def fit_displacement(fixed_nhw: np.ndarray, moving_nhw: np.ndarray, settings: WarpFitSettings = WarpFitSettings(),
                     fixed_mask_nhw: Optional[np.ndarray] = None, moving_mask_nhw: Optional[np.ndarray] = None,
                     progress=None, cancel=None, phase: str = "warp") -> np.ndarray:
    """Fit the network on the slice pairs and return the displacement [N, 2, H, W] (rows, cols; frame pixels) that
    maps each target pixel to where it is read in the reference: warped(x) = moving(x + d(x)).

    With `fixed_mask_nhw` / `moving_mask_nhw` ([N, H, W] in [0, 1]: a target mask and the reference mask on the same
    grid) the mask-alignment term is added (the refit after SAM refined the target mask)."""
    import torch
    import torch.nn.functional as F

    if settings.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}")
    n, height, width = fixed_nhw.shape
    grid_h, grid_w = _fit_grid(height, width, settings.resolution)
    resize = lambda a: F.interpolate(torch.tensor(np.asarray(a, dtype=np.float32))[:, None],  # noqa: E731
                                     size=(grid_h, grid_w), mode="bilinear", align_corners=False,
                                     antialias=grid_h < height)
    fixed, moving = _standardised(resize(fixed_nhw)), _standardised(resize(moving_nhw))
    masks = None
    if fixed_mask_nhw is not None and moving_mask_nhw is not None and settings.mask_weight > 0:
        masks = resize(fixed_mask_nhw), resize(moving_mask_nhw)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = _network(settings.width)
    coarse_shape = (max(2, grid_h // settings.control_spacing), max(2, grid_w // settings.control_spacing))
    field = torch.zeros((n, 2) + coarse_shape, requires_grad=True)
    optimiser = torch.optim.Adam([{"params": net.parameters(), "lr": settings.learning_rate},
                                  {"params": [field], "lr": settings.field_learning_rate}])
    pair = torch.cat([fixed, moving], dim=1)

    def model(inputs, flip_dims=None):
        coarse = field if flip_dims is None else _flip_field(field, flip_dims)
        up = F.interpolate(coarse, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return up + net(inputs)

    report(progress, phase, 0, settings.iterations)
    for step in range(settings.iterations):
        check_cancel(cancel)
        optimiser.zero_grad()
        displacement = model(pair)
        warped = warp_tensor(moving, displacement)
        loss = dissimilarity(fixed, warped, settings) + settings.smoothness * _smoothness(displacement)
        if settings.consistency > 0:
            dims = [3] if bool(torch.rand((), generator=generator) < 0.5) else [2]  # left-right or up-down flip
            flipped = model(torch.flip(pair, dims), dims)
            loss = loss + settings.consistency * ((flipped - _flip_field(displacement, dims)) ** 2).mean()
        if masks is not None:
            warped_mask = warp_tensor(masks[1], displacement)
            overlap = (warped_mask * masks[0]).sum()
            loss = loss + settings.mask_weight * (1.0 - 2.0 * overlap / (warped_mask.sum() + masks[0].sum() + 1e-6))
        loss.backward()
        optimiser.step()
        if step % 10 == 9 or step == settings.iterations - 1:
            report(progress, phase, step + 1, settings.iterations)
    with torch.no_grad():
        displacement = model(pair)
        scale = torch.tensor([height / grid_h, width / grid_w], dtype=torch.float32).reshape(1, 2, 1, 1)
        full = F.interpolate(displacement * scale, size=(height, width), mode="bilinear", align_corners=False)
    return full.numpy().astype(np.float32)


def warp_frames(stack_nhw: np.ndarray, displacement: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """[N, H, W] sampled at x + displacement ([N, 2, H, W], frame pixels)."""
    import torch

    images = torch.tensor(np.asarray(stack_nhw, dtype=np.float32))[:, None]  # a copy: inputs may be read-only
    with torch.no_grad():
        warped = warp_tensor(images, torch.tensor(np.asarray(displacement, dtype=np.float32)), mode)
    return warped[:, 0].numpy().astype(np.float32)


def image_dissimilarity(fixed_nhw: np.ndarray, moving_nhw: np.ndarray,
                        settings: WarpFitSettings = WarpFitSettings()) -> float:
    """The loss's image term between two stacks at the fitting resolution (to compare before / after a warp)."""
    import torch
    import torch.nn.functional as F

    n, height, width = fixed_nhw.shape
    grid_h, grid_w = _fit_grid(height, width, settings.resolution)
    resize = lambda a: F.interpolate(torch.tensor(np.asarray(a, dtype=np.float32))[:, None],  # noqa: E731
                                     size=(grid_h, grid_w), mode="bilinear", align_corners=False,
                                     antialias=grid_h < height)
    with torch.no_grad():
        return float(dissimilarity(_standardised(resize(fixed_nhw)), _standardised(resize(moving_nhw)), settings))
