"""Time of the learned warp's test-time fit (issue 14 item 1: a 20-slice volume in under 2 minutes on CPU at the
default settings). Fixed: ACDC patient001 ED + ES slices stacked (20 slices, 256 x 216 px); moving: patient002 ED + ES
resized to that grid. Prints wall and CPU seconds, the machine's load, and the image dissimilarity before and after.

    .venv/bin/python benchmarks/warp_fit.py [--threads 2] [--iterations 150] [--resolution 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
DATA = REPO.parent / "shared" / "data" / "acdc"

from proxyprompt.frames import make_slice_stack  # noqa: E402
from proxyprompt.learned_warp import WarpFitSettings, fit_displacement, image_dissimilarity, warp_frames  # noqa: E402
from proxyprompt.volume import read_image  # noqa: E402


def stacked(patient: str) -> np.ndarray:
    """[N, H, W] frames of the patient's ED then ES volume."""
    return np.concatenate([make_slice_stack(read_image(DATA / f"{patient}_{phase}_image.nii.gz")).images
                           for phase in ("ED", "ES")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=WarpFitSettings.iterations)
    parser.add_argument("--resolution", type=int, default=WarpFitSettings.resolution)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    fixed, moving = stacked("patient001"), stacked("patient002")
    count = min(len(fixed), len(moving))
    fixed = fixed[:count]
    moving = F.interpolate(torch.tensor(moving[:count])[:, None], size=fixed.shape[1:], mode="bilinear",
                           align_corners=False)[:, 0].numpy()
    settings = WarpFitSettings(iterations=args.iterations, resolution=args.resolution)
    load = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    displacement = fit_displacement(fixed, moving, settings)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    before, after = image_dissimilarity(fixed, moving, settings), image_dissimilarity(
        fixed, warp_frames(moving, displacement), settings)
    print(f"{count} slices {fixed.shape[1]} x {fixed.shape[2]} px, {args.iterations} steps at {args.resolution} px, "
          f"{args.threads} torch threads, load {load[0]:.2f}: fit {wall:.1f} s wall, {cpu:.1f} s CPU; "
          f"dissimilarity {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
