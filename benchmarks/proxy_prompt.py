"""Proxy-prompt accuracy (issue 15 item 6): trained checkpoints, one-shot on held-out pairs, next to registration.

For every (target, reference) pair of the given cases (target != reference; none of them may be a training case of
a checkpoint: the training files' names are compared with the cases', refused otherwise) it runs
`proxy-prompt` with each checkpoint on the model (real weights), and registration alone (`--model none`, the
engine's default registration generator), and reports mean 3D Dice per structure. One Engine is kept: each target is
encoded once, each reference once (the model keeps the last reference stacks' features).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/proxy_prompt.py --data ../shared/data/acdc \\
        --targets patient022_ED patient028_ED patient030_ED patient039_ED --references patient011_ED patient019_ED \\
        --checkpoint cardiac=/tmp/pp/acdc_ed_litemedsam.pt --training-log cardiac=/tmp/pp/acdc_ed_litemedsam.jsonl \\
        --section proxy-prompt-acdc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import write_section  # noqa: E402

from proxyprompt.cases import load_reference_case  # noqa: E402
from proxyprompt.generators.checkpoints import read_generator_checkpoint  # noqa: E402
from proxyprompt.metrics import dice  # noqa: E402
from proxyprompt.pipeline import Engine  # noqa: E402
from proxyprompt.volume import read_image, read_label  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"


def named(values):
    return dict(value.split("=", 1) for value in values or [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--targets", nargs="+", required=True, help="case names (file prefix before _image)")
    parser.add_argument("--references", nargs="+", required=True)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--training-log", action="append", metavar="NAME=PATH", help="JSON-lines log of a checkpoint")
    parser.add_argument("--training-cases", action="append", metavar="NAME=CASE,CASE",
                        help="the cases a checkpoint was trained on (refused as evaluation cases)")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--section", help="write the table into docs/benchmarks.md between these markers")
    parser.add_argument("--title", default="")
    parser.add_argument("--json", type=Path, help="also write the raw per-pair results here")
    args = parser.parse_args()

    checkpoints = named(args.checkpoint)
    training_cases = {name: set(text.split(",")) for name, text in named(args.training_cases).items()}
    labels_json = json.loads((args.data / "labels.json").read_text())
    names = {int(k): (v["name"] if isinstance(v, dict) else str(v)) for k, v in
             (labels_json.items() if isinstance(labels_json, dict) else enumerate(labels_json))}
    for name, cases in training_cases.items():
        overlap = cases & (set(args.targets) | set(args.references))
        if overlap:
            raise SystemExit(f"checkpoint {name} was trained on {sorted(overlap)}: not a held-out evaluation")
    metas = {name: read_generator_checkpoint(path)[0] for name, path in checkpoints.items()}

    engine = Engine(args.model)
    baseline = Engine("none")
    rows = []  # (method, target, reference, {label: dice}, seconds)
    for target_name in args.targets:
        target = read_image(args.data / f"{target_name}_image.nii.gz")
        truth, _ = read_label(args.data / f"{target_name}_label.nii.gz")
        for reference_name in args.references:
            if reference_name == target_name:
                continue
            reference = load_reference_case(args.data / f"{reference_name}_image.nii.gz",
                                            args.data / f"{reference_name}_label.nii.gz")
            runs = [(f"proxy-prompt ({name})", engine, "proxy-prompt", {"generator_checkpoint": path})
                    for name, path in checkpoints.items()]
            runs.append(("registration alone (model none)", baseline, None, None))
            for method, runner, generator, options in runs:
                tick = time.perf_counter()
                result = runner.segment([reference], target, generator=generator, options=options)
                seconds = time.perf_counter() - tick
                scores = {v: dice(result.label.array == v, truth.array == v) for v in sorted(names)}
                rows.append((method, target_name, reference_name, scores, seconds))
                print(f"{method:<40} {target_name} <- {reference_name}: "
                      + " ".join(f"{names[v]} {d:.3f}" for v, d in scores.items()) + f" ({seconds:.1f} s)",
                      flush=True)

    methods = list(dict.fromkeys(row[0] for row in rows))
    lines = [f"| method | {' | '.join(names[v] for v in sorted(names))} | mean | s per pair | pairs |",
             "|---" * (len(names) + 4) + "|"]
    summary = {}
    for method in methods:
        chosen = [row for row in rows if row[0] == method]
        per_label = {v: float(np.mean([row[3][v] for row in chosen])) for v in sorted(names)}
        mean = float(np.mean(list(per_label.values())))
        summary[method] = {"per_label": per_label, "mean": mean}
        lines.append(f"| {method} | {' | '.join(f'{d:.3f}' for d in per_label.values())} | **{mean:.3f}** | "
                     f"{np.mean([row[4] for row in chosen]):.1f} | {len(chosen)} |")
    trained = []
    for name, meta in metas.items():
        text = (f"`{name}`: {meta.num_masks} masks, model {meta.model} at {meta.image_size} px, labels "
                f"{', '.join(meta.label_names.values())}")
        if name in training_cases:
            text += f", trained on {', '.join(sorted(training_cases[name]))}"
        log_path = named(args.training_log).get(name)
        if log_path and Path(log_path).is_file():
            records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
            if records:
                first = np.mean([r["loss"] for r in records[:10]])
                last = np.mean([r["loss"] for r in records[-10:]])
                text += (f"; {records[-1]['step']} steps, loss {first:.3f} (first 10) -> {last:.3f} (last 10), "
                         f"{records[-1]['seconds']:.0f} s of steps")
        trained.append(f"- {text}")
    load = os.getloadavg()
    text = "\n".join([
        f"### {args.title or 'proxy-prompt, one-shot on held-out cases'}",
        "",
        f"Targets {', '.join(args.targets)}; references {', '.join(args.references)} (every target with every "
        f"reference); model `{args.model}`; mean 3D Dice per structure. Checkpoints:",
        *trained,
        "",
        *lines,
        "",
        f"Run on {platform.machine()} {os.cpu_count()} CPUs, load average {load[0]:.1f} at the end, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        "```",
        "OMP_NUM_THREADS=1 " + " ".join(["python", "benchmarks/proxy_prompt.py", *sys.argv[1:]]),
        "```",
    ])
    print(text)
    if args.section:
        write_section(DOC, args.section, text)
    if args.json:
        args.json.write_text(json.dumps({"rows": [dict(method=r[0], target=r[1], reference=r[2],
                                                        dice={str(k): v for k, v in r[3].items()}, seconds=r[4])
                                                   for r in rows], "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
