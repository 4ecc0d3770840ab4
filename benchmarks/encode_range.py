"""Issue 17 item 2 check: encoding only the slices that can hold a structure leaves the segmentation unchanged.

LiteMedSAM (real weights) on shared pairs of both anatomies, with the default generator (support-memory) and the
registration prior: each pair is run twice on one Engine, first with the target's features empty (the model encodes
only what propagation asks for), then with every slice encoded beforehand (the pre-issue-17 behaviour: the same run
on complete features). Reports mean Dice against the ground truth of both, the largest per-pair difference and how
many slices were encoded. No setting is chosen here (nothing to tune): every pair is a check.

Pairs: ACDC, the first `--pairs` patients (sorted) of ../shared/data/acdc, ED, each from the next patient (the
pairs of benchmarks/accuracy.py); hippocampus, the first `--pairs` subjects, each from the next subject.

    .venv/bin/python benchmarks/encode_range.py --pairs 3 [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DOC = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(ROOT / "SlicerProxyPrompt"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import write_section  # noqa: E402


def pairs(anatomy: str, count: int):
    folder = DATA / anatomy
    names = sorted(p.name[: -len("_image.nii.gz")] for p in folder.glob("*_image.nii.gz"))
    if anatomy == "acdc":
        names = [n for n in names if n.endswith("_ED")]
    names = names[: count + 1]
    return [(names[i + 1], names[i]) for i in range(min(count, len(names) - 1))]  # (reference, target)


def mean_dice(label, truth) -> float:
    from proxyprompt.metrics import dice

    values = [int(v) for v in np.unique(truth) if v != 0]
    return float(np.mean([dice(np.asarray(label) == v, np.asarray(truth) == v) for v in values]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--generators", nargs="+", default=["support-memory", "registration"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import torch

    from proxyprompt.cases import load_reference_case
    from proxyprompt.pipeline import Engine
    from proxyprompt.volume import read_image, read_label

    torch.set_num_threads(2)
    engine = Engine(model="litemedsam", device="cpu")
    rows, lines = [], []
    started = time.perf_counter()
    for anatomy in ("acdc", "hippocampus"):
        folder = DATA / anatomy
        for generator in args.generators:
            per_pair = []
            for reference, target in pairs(anatomy, args.pairs):
                case = load_reference_case(folder / f"{reference}_image.nii.gz", folder / f"{reference}_label.nii.gz")
                image = read_image(folder / f"{target}_image.nii.gz")
                truth, _ = read_label(folder / f"{target}_label.nii.gz")
                engine.model._feature_cache.clear()
                restricted = engine.segment([case], image, generator=generator)
                frames = engine._frames(image, None)
                engine.model.features(frames)  # every slice, as before issue 17
                everything = engine.segment([case], image, generator=generator)
                record = {"pair": f"{target} <- {reference}", "restricted": mean_dice(restricted.label.array, truth.array),
                          "all": mean_dice(everything.label.array, truth.array),
                          "encoded": restricted.info["encoded_slices"], "slices": frames.num_slices,
                          "identical": bool(np.array_equal(restricted.label.array, everything.label.array))}
                per_pair.append(record)
                print(json.dumps({"anatomy": anatomy, "generator": generator, **record}), flush=True)
            rows.append((anatomy, generator, per_pair))
    minutes = (time.perf_counter() - started) / 60
    table = ["| anatomy | generator | pairs | mean Dice, only slices that can hold a structure | mean Dice, every "
             "slice encoded | largest per-pair difference | identical label maps | slices encoded |",
             "|---|---|---|---|---|---|---|---|"]
    for anatomy, generator, per_pair in rows:
        a = np.mean([r["restricted"] for r in per_pair])
        b = np.mean([r["all"] for r in per_pair])
        worst = max(abs(r["restricted"] - r["all"]) for r in per_pair)
        table.append(f"| {anatomy} | {generator} | {len(per_pair)} | {a:.4f} | {b:.4f} | {worst:.4f} | "
                     f"{sum(r['identical'] for r in per_pair)} of {len(per_pair)} | "
                     f"{sum(r['encoded'] for r in per_pair)} of {sum(r['slices'] for r in per_pair)} |")
    text = "\n".join([
        "## Encode only what can hold a structure: unchanged accuracy (issue 17 item 2)",
        "",
        f"Date: {datetime.date.today().isoformat()}; LiteMedSAM (real weights), CPU; {minutes:.1f} min. Each pair run "
        "twice on one Engine: the target's features empty (encoded on demand: the slices propagation asks for), then "
        "every slice encoded first (the behaviour before issue 17). Pairs: " + "; ".join(
            f"{anatomy}: " + ", ".join(r["pair"] for r in per_pair) for anatomy, generator, per_pair in rows
            if generator == args.generators[0]) + ". Checks only, no setting chosen.",
        "",
        f"Command: `.venv/bin/python benchmarks/encode_range.py --pairs {args.pairs}`",
        "",
        *table,
    ])
    if not args.no_write:
        write_section(DOC, "encode-range", text)
    print(text)


if __name__ == "__main__":
    main()
