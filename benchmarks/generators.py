"""Each generator with each model, per anatomy (issue 16 item 6): one-shot mean 3D Dice per structure on any data
folder of ``*_image.nii.gz`` + ``*_label.nii.gz`` (+ ``labels.json``), e.g. ``../shared/data/hippocampus`` and
``../shared/data/acdc``.

Pairs: target i (of the sorted cases, from ``--first``) with reference i + ``--offset`` (cyclic), as in
``benchmarks/oneshot.py``. Rows: ``registration`` with model ``none`` (registration alone, the baseline every
generator is compared with) and each ``--generators`` entry with each ``--models`` entry, through the engine's
defaults (what ``proxyprompt segment`` runs). The registration of a pair is computed once and shared by the rows;
the target's image features are computed once per model and target
and shared by that model's rows; the first row of a model pays them (its seconds say so).

Writes the section ``generators-<folder>[-<glob>]`` of docs/benchmarks.md unless ``--no-write``.

    .venv/bin/python benchmarks/generators.py --data ../shared/data/hippocampus --first 10 --targets 4 --offset 2
    .venv/bin/python benchmarks/generators.py --data ../shared/data/acdc --glob '*_ED_image.nii.gz' --first 10 \
        --targets 4 --offset 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import write_section  # noqa: E402
from oneshot import case_names, per_label_dice  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
BASELINE = ("registration", "none")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--glob", default="*_image.nii.gz")
    parser.add_argument("--first", type=int, default=0, help="index of the first target (sorted cases)")
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--offset", type=int, default=2, help="the reference of target i is case i + offset")
    parser.add_argument("--generators", nargs="+", default=["registration", "support-memory", "warp"])
    parser.add_argument("--models", nargs="+", default=["litemedsam"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the per-pair rows here")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from proxyprompt.generators.base import ReferenceCase
    from proxyprompt.pipeline import Engine
    from proxyprompt.volume import read_image, read_label

    # The registration of a pair is the same whichever generator / model consumes it (deterministic, tested):
    # computed once per pair and shared by the rows (the first row that needs it pays it).
    import hashlib

    import proxyprompt.generators.registration as registration_generator

    register = registration_generator.segment_by_registration
    memo = {}

    def digest(value) -> str:
        return hashlib.sha1(np.ascontiguousarray(getattr(value, "array", value)).tobytes()).hexdigest()

    def memoised_register(references, target_image, *a, **k):
        options = tuple(sorted((n, repr(v)) for n, v in k.items() if n not in ("cancel", "progress", "known")))
        known = tuple(None if m is None else digest(m) for m in (k.get("known") or []))
        key = (tuple((id(i), digest(l)) for i, l in references), a, options, known)
        if memo.get("target") is not target_image:  # one target at a time
            memo.clear()
            memo["target"] = target_image
        if key not in memo:
            memo[key] = register(references, target_image, *a, **k)
        return memo[key]

    registration_generator.segment_by_registration = memoised_register
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    names = case_names(args.data, args.glob)
    table_path = args.data / "labels.json"
    label_names = {int(k): v for k, v in json.loads(table_path.read_text()).items()} if table_path.is_file() else {}
    rows = [BASELINE] + [(g, m) for m in args.models for g in args.generators]
    engines = {model: Engine(model=model, device="cpu") for model in {"none", *args.models}}
    results = {row: [] for row in rows}
    values = None
    pairs = []
    for t in range(args.first, args.first + args.targets):
        target_name, reference_name = names[t % len(names)], names[(t + args.offset) % len(names)]
        pairs.append(f"{target_name} <- {reference_name}")
        target_image = read_image(args.data / f"{target_name}_image.nii.gz")
        truth = np.asarray(read_label(args.data / f"{target_name}_label.nii.gz")[0].array)
        reference_label, table = read_label(args.data / f"{reference_name}_label.nii.gz")
        reference = ReferenceCase(read_image(args.data / f"{reference_name}_image.nii.gz"), reference_label, table)
        if values is None:
            values = sorted(int(v) for v in np.unique(np.asarray(reference_label.array)) if v != 0)
        for generator, model in rows:
            tick = time.perf_counter()
            try:
                result = engines[model].segment([reference], target_image, generator=generator)
            except Exception as error:  # reported, not hidden: the row is left out for this pair
                print(f"{target_name} <- {reference_name} {generator} + {model}: FAILED {type(error).__name__}: "
                      f"{error}", flush=True)
                continue
            entry = {"pair": pairs[-1], "seconds": time.perf_counter() - tick,
                     "dice": per_label_dice(np.asarray(result.label.array), truth, values),
                     "quality": result.info.get("quality"), "notes": result.info.get("notes", [])}
            results[(generator, model)].append(entry)
            print(f"{pairs[-1]} {generator:>14} + {model:<10}: "
                  + " ".join(f"{d:.3f}" for d in entry["dice"]) + f"  mean {np.mean(entry['dice']):.3f}"
                  + f"  ({entry['seconds']:.1f} s)", flush=True)

    baseline = {e["pair"]: float(np.mean(e["dice"])) for e in results[BASELINE]}
    columns = [label_names.get(v, str(v)) for v in values]
    lines = ["| generator + model | " + " | ".join(columns) + " | mean | vs registration alone (same pairs) | "
             "pairs better / worse | s per pair | n |", "|---" * (len(columns) + 6) + "|"]
    for row in rows:
        entries = results[row]
        if not entries:
            lines.append(f"| {row[0]} + {row[1]} | " + " | ".join("-" for _ in columns) + " | - | - | - | - | 0 |")
            continue
        scores = np.asarray([e["dice"] for e in entries])
        means = scores.mean(axis=1)
        paired = [(float(np.mean(e["dice"])), baseline[e["pair"]]) for e in entries if e["pair"] in baseline]
        delta = float(np.mean([a - b for a, b in paired])) if paired else float("nan")
        better = sum(a > b + 1e-3 for a, b in paired)
        worse = sum(a < b - 1e-3 for a, b in paired)
        lines.append(f"| {row[0]} + {row[1]} | " + " | ".join(f"{v:.3f}" for v in scores.mean(axis=0))
                     + f" | {means.mean():.3f} | {delta:+.3f} | {better} / {worse} | "
                     f"{np.mean([e['seconds'] for e in entries]):.1f} | {len(entries)} |")
    glob_text = "" if args.glob == "*_image.nii.gz" else f" --glob '{args.glob}'"
    command = (f".venv/bin/python benchmarks/generators.py --data {args.data}{glob_text} --first {args.first} "
               f"--targets {args.targets} --offset {args.offset} --generators {' '.join(args.generators)} "
               f"--models {' '.join(args.models)}")
    folder = args.data.name + ("" if args.glob == "*_image.nii.gz" else "-" + args.glob.split("_image")[0].strip("*_"))
    section_name = f"generators-{folder}"
    section = "\n".join([
        f"<!-- {section_name}:start -->",
        f"## Each generator with LiteMedSAM, one-shot: {folder}",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average {load_at_start[0]:.1f} at the start "
        f"(2 cores); wall time {(time.perf_counter() - started) / 60:.1f} min.",
        "",
        f"Command: `{command}`",
        "",
        f"Pairs (target <- reference): {'; '.join(pairs)}. Each row runs the engine's defaults for that generator "
        "and model (`proxyprompt segment --generator G --model M`). Mean 3D Dice per structure; `vs registration "
        "alone`: mean over the same pairs of (row - registration + none); `s per pair`: wall seconds on a shared CPU "
        "(the first row of a model encodes the target; later rows of that model reuse its features).",
        "",
        *lines,
        "",
        f"<!-- {section_name}:end -->",
    ])
    print(section)
    if args.json:
        args.json.write_text(json.dumps({f"{g} + {m}": v for (g, m), v in results.items()}, indent=1))
    if not args.no_write:
        write_section(DOC, section_name, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
