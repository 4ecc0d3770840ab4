"""bf16 vs fp32 with real weights: LiteMedSAM Dice with ground-truth boxes on the middle slices of ACDC volumes.

For each volume, every slice in the middle half and each cavity (RV = 1, LV = 3) with >= 20 pixels is
segmented from its ground-truth bounding box, once with the image encoder in float32 and once under bf16
autocast (`--precision`); prints the mean Dice of each and the largest per-slice difference.
It first times the kernels that dominate SAM 2 propagation (memory-attention SDPA and a linear layer, the
shapes of 3 objects x 7 memories at 512 and 1024 px) in float32 and bf16 on this CPU.

    .venv/bin/python benchmarks/precision.py [--cases patient002_ED patient022_ES patient064_ED patient083_ES]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "acdc"
sys.path.insert(0, str(ROOT / "SlicerProxyPrompt"))

from proxyprompt.frames import make_slice_stack  # noqa: E402
from proxyprompt.metrics import dice  # noqa: E402
from proxyprompt.models.loader import load_model  # noqa: E402
from proxyprompt.volume import read_image, read_label  # noqa: E402


def dices_for(precision: str, cases) -> list:
    model = load_model("litemedsam", device="cpu", precision=precision)
    dices = []
    for case in cases:
        frames = make_slice_stack(read_image(DATA / f"{case}_image.nii.gz"))
        truth = np.asarray(read_label(DATA / f"{case}_label.nii.gz")[0].array)
        model.features(frames)
        count = frames.num_slices
        for k in range(count // 4, 3 * count // 4 + 1):
            for value in (1, 3):
                mask = truth[k] == value
                if mask.sum() < 20:
                    continue
                rows, cols = np.nonzero(mask)
                box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)
                probability, _ = model.predict_slice(k, box, frames=frames)
                predicted = probability > 0.5
                dices.append(dice(predicted, mask))
    return dices


def kernel_seconds(repeats: int = 3) -> None:
    """Seconds per call of SDPA [3, 1, N, 256] x [3, 1, 7N, 256] and of [3N, 256] @ [256, 2048], fp32 vs bf16."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    for tokens in (1024, 4096):  # 512 px and 1024 px feature maps
        query, key, value = torch.randn(3, 1, tokens, 256), torch.randn(3, 1, 7 * tokens, 256), torch.randn(3, 1, 7 * tokens, 256)
        activation, weight = torch.randn(3 * tokens, 256), torch.randn(2048, 256)
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, a, w = (t.to(dtype) for t in (query, key, value, activation, weight))
            for name, call in (("sdpa", lambda: F.scaled_dot_product_attention(q, k, v)), ("linear", lambda: a @ w.T)):
                call()  # warm-up
                started = time.perf_counter()
                for _ in range(repeats):
                    call()
                seconds[(name, dtype)] = (time.perf_counter() - started) / repeats
        for name in ("sdpa", "linear"):
            full, half = seconds[(name, torch.float32)], seconds[(name, torch.bfloat16)]
            print(f"{tokens} tokens {name}: fp32 {full:.4f} s, bf16 {half:.4f} s, {full / half:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["patient002_ED", "patient022_ES", "patient064_ED", "patient083_ES"])
    args = parser.parse_args()
    kernel_seconds()
    results = {precision: np.array(dices_for(precision, args.cases)) for precision in ("fp32", "bf16")}
    for precision, dices in results.items():
        print(f"{precision}: mean Dice {dices.mean():.4f} over {len(dices)} slice-structures")
    difference = results["fp32"] - results["bf16"]
    print(f"max |difference| {np.abs(difference).max():.4f}, mean difference {difference.mean():.4f}")


if __name__ == "__main__":
    main()
