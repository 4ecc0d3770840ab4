"""The model stage from a prior (issue 16 item 2, issue 14): does LiteMedSAM add to the prior it is prompted from?

Per pair (target i, reference i+offset, cases sorted by name, cyclic) the prior is computed once (cached under
--cache): the registration generator's prior (`--prior registration`: candidates chosen by evidence, deformable, as a
model's prior) or the warp generator's (`--prior warp-registration` / `warp-learned`). Then each row runs the real
LiteMedSAM weights from that same prior with one `PriorPolicy` (`generators.prior_refinement`) through the engine
(compose, largest component), and Dice per structure is taken against the target's label. The per-pair split: pairs
where the prior was right (mean Dice >= 0.5) or wrong, and per row how the model changed each.

    python benchmarks/model_stage.py --data ../shared/data/acdc --glob '*_ED_image.nii.gz' --targets 5 --offset 1

`--registration-alone` adds the registration generator with model none (its defaults) on the same pairs;
`--prior registration-intensity` prompts the model from that result instead (the intensity stage's labels);
`--warp-generator registration,learned` adds the whole warp generator (its own prior and refinement rounds) with model
none and with LiteMedSAM; `--save-labels DIR` writes every row's label volume for a per-slice look.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
sys.path.insert(0, str(REPO / "benchmarks"))

from proxyprompt.contract import PromptPlan, ReferenceCase  # noqa: E402
from proxyprompt.frames import make_slice_stack  # noqa: E402
from proxyprompt.generators.base import GeneratorContext, register_generator  # noqa: E402
from proxyprompt.generators.warp import WarpGenerator  # noqa: E402
from proxyprompt.options import EngineOptions  # noqa: E402
from proxyprompt.generators.registration import RegistrationGenerator, plan_from_label_stack  # noqa: E402
from proxyprompt.metrics import dice  # noqa: E402
from proxyprompt.pipeline import Engine  # noqa: E402
from proxyprompt.volume import read_image, read_label  # noqa: E402

# row name -> (generator options, refinement rounds). The warp generator's prompts from the cached prior; rounds 0:
# the model stage alone (what the registration generator does with a memory-less model). "frame3": a box margin of 3
# frame pixels whatever the frame's size (the margin before it was given in model-input pixels), converted per pair.
FRAME3 = "frame3"
PLAIN = {"prior_crop_margin": -1.0, "prior_min_agreement": 0.0, "prior_box_margin": FRAME3, "prior_min_stability": 0.0}
ROWS = {
    "plain (whole frame, box)": (PLAIN, 0),
    "whole frame + choice 0.5": ({**PLAIN, "prior_min_agreement": 0.5}, 0),
    "whole frame + choice 0.7": ({**PLAIN, "prior_min_agreement": 0.7}, 0),
    "crop 0.3": ({**PLAIN, "prior_crop_margin": 0.3}, 0),
    "crop 0.3 + choice 0.5": ({**PLAIN, "prior_crop_margin": 0.3, "prior_min_agreement": 0.5}, 0),
    "crop 0.6 + choice 0.5": ({**PLAIN, "prior_crop_margin": 0.6, "prior_min_agreement": 0.5}, 0),
    "whole frame + choice 0.5 + 3 rounds": ({**PLAIN, "prior_min_agreement": 0.5}, 3),
    "whole frame + choice 0.5 + mask input + 3 rounds": (
        {**PLAIN, "prior_min_agreement": 0.5, "warp_prompts": "box,mask"}, 3),
    "crop 0.3 + choice 0.5 + 3 rounds": ({**PLAIN, "prior_crop_margin": 0.3, "prior_min_agreement": 0.5}, 3),
    # issue 16 item 2, hippocampus: the box margin in model-input pixels, the per-structure stability check
    "margin 5 input px": ({**PLAIN, "prior_box_margin": 5.0}, 0),
    "margin 5 input px + choice 0.7": ({**PLAIN, "prior_box_margin": 5.0, "prior_min_agreement": 0.7}, 0),
    "margin 5 input px + stability 0.7": ({**PLAIN, "prior_box_margin": 5.0, "prior_min_stability": 0.7}, 0),
    "margin 5 input px + stability 0.8": ({**PLAIN, "prior_box_margin": 5.0, "prior_min_stability": 0.8}, 0),
    "margin 5 input px + stability 0.85": ({**PLAIN, "prior_box_margin": 5.0, "prior_min_stability": 0.85}, 0),
    "margin 5 input px + stability 0.8 + choice 0.5": (
        {**PLAIN, "prior_box_margin": 5.0, "prior_min_stability": 0.8, "prior_min_agreement": 0.5}, 0),
    "margin 5 input px + 3 rounds": ({**PLAIN, "prior_box_margin": 5.0}, 3),
    # the crop around the prior (MedSAM's practice: the structures fill the 256 px input) on top of the defaults
    **{f"crop {c:g} + margin 5 input px + stability 0.85": (
        {**PLAIN, "prior_crop_margin": c, "prior_box_margin": 5.0, "prior_min_stability": 0.85}, 0)
       for c in (0.1, 0.25, 0.5)},
    "margin 5 input px + stability 0.85 + 3 rounds": (
        {**PLAIN, "prior_box_margin": 5.0, "prior_min_stability": 0.85}, 3),
}

_PRIORS = {}


@register_generator
class CachedPriorGenerator(WarpGenerator):
    """The warp generator on the benchmark's prior, computed once per pair (the warp is not re-run per row)."""

    name = "cached-prior"
    description = "benchmark only: the warp generator on a precomputed prior"

    def warp_prior_plan(self, context):
        stack = _PRIORS["current"]
        return PromptPlan(objects=plan_from_label_stack(stack, context.labels), optional_fields=("prior",))


def markdown_table(results, rows, labels, table, prior_name) -> str:
    """Rows: the prior alone, then each model row; Dice per structure (mean), mean, the per-pair split by whether
    the prior was right (its mean Dice >= 0.5): the row's mean vs the prior's on those pairs; seconds per volume."""
    prior_means = np.array([np.mean(e["prior"]) for e in results])
    right = prior_means >= 0.5
    names = [table.get(str(v), str(v)) for v in labels]

    def split(values, mask):
        return f"{values[mask].mean():.3f} ({int(mask.sum())})" if mask.any() else "-"

    lines = [f"| row (prior: {prior_name}) | " + " | ".join(names) + " | mean | prior right: row / prior (n) | "
             "prior wrong: row / prior (n) | s / volume |", "|---" * (len(labels) + 5) + "|"]
    per = " | ".join(f"{np.mean([e['prior'][i] for e in results]):.3f}" for i in range(len(labels)))
    lines.append(f"| prior alone | {per} | {prior_means.mean():.3f} | {split(prior_means, right)} | "
                 f"{split(prior_means, ~right)} | {np.nanmean([e['prior_seconds'] for e in results]):.1f} |")
    if all("registration_alone" in e for e in results):  # the registration generator with model none
        alone = np.array([np.mean(e["registration_alone"]["dice"]) for e in results])
        per = " | ".join(f"{np.mean([e['registration_alone']['dice'][i] for e in results]):.3f}"
                         for i in range(len(labels)))
        lines.append(f"| registration alone (model none) | {per} | {alone.mean():.3f} | {split(alone, right)} / "
                     f"{split(prior_means, right)} | {split(alone, ~right)} / {split(prior_means, ~right)} | "
                     f"{np.mean([e['registration_alone']['seconds'] for e in results]):.1f} |")
    for row in rows:
        means = np.array([np.mean(e["rows"][row]["dice"]) for e in results])
        per = " | ".join(f"{np.mean([e['rows'][row]['dice'][i] for e in results]):.3f}" for i in range(len(labels)))
        lines.append(f"| {row} | {per} | {means.mean():.3f} | {split(means, right)} / {split(prior_means, right)} | "
                     f"{split(means, ~right)} / {split(prior_means, ~right)} | "
                     f"{np.mean([e['rows'][row]['seconds'] for e in results]):.1f} |")
    return "\n".join(lines)


def case_names(data: Path, pattern: str):
    names = sorted(p.name[: -len("_image.nii.gz")] for p in data.glob(pattern))
    return [n for n in names if (data / f"{n}_label.nii.gz").is_file()]


def compute_prior(kind: str, reference: ReferenceCase, target, labels):
    """[N, H, W] label stack of the prior on the target's frames."""
    frames = make_slice_stack(target)
    context = GeneratorContext(references=[reference], target_image=target, target_frames=frames, labels=labels,
                               model=object())  # a model's prior (cleaned, deformable)
    if kind.startswith("registration"):  # registration: deformable (a model's default); registration-intensity:
        # with the gated intensity EM (what the registration generator returns with model none)
        plan = RegistrationGenerator.plan_with_method(context, "intensity" if kind.endswith("intensity") else "deformable")
    else:
        context.options = {"warp": kind.split("-", 1)[1]}
        plan = WarpGenerator().warp_prior_plan(context)
    stack = np.zeros(frames.images.shape, np.uint16)
    for value in labels:
        stack[np.asarray(plan.objects[value].prior) > 0.5] = value
    return stack


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--glob", default="*_image.nii.gz")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--targets", type=int, default=5)
    parser.add_argument("--offset", type=int, default=1)
    parser.add_argument("--prior", default="registration",
                        choices=("registration", "registration-intensity", "warp-registration", "warp-learned"))
    parser.add_argument("--rows", default=";".join(ROWS), help="semicolon-separated row names")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/proxyprompt-model-stage"))
    parser.add_argument("--registration-alone", action="store_true",
                        help="also run the registration generator with model none (its defaults) on each pair")
    parser.add_argument("--warp-generator", default="",
                        help="comma-separated warps (registration, learned): also run the whole warp generator on each "
                             "pair (its own prior, not the cached one), with model none (the warp prior alone) and "
                             "with LiteMedSAM (box prompts, the engine's refinement rounds)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--save-labels", type=Path,
                        help="folder: write each pair's prior and each row's label volume (.npy, target's array "
                             "order) for a per-slice look")
    parser.add_argument("--table-from", type=Path, help="only print the table of a --json file written earlier")
    args = parser.parse_args(argv)
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        first = saved["pairs"][0]
        labels = [int(v) for v in saved["labels"]]
        print(markdown_table(saved["pairs"], list(first["rows"]), labels,
                             {k: v for k, v in saved["labels"].items()}, args.prior))
        return 0
    rows = [r for r in args.rows.split(";") if r]
    warps = [w for w in args.warp_generator.split(",") if w]
    whole = {f"warp generator, {w}, model none": (w, "none") for w in warps}
    whole.update({f"warp generator, {w}, LiteMedSAM": (w, "litemedsam") for w in warps})
    args.cache.mkdir(parents=True, exist_ok=True)
    names = case_names(args.data, args.glob)
    table = json.loads((args.data / "labels.json").read_text())
    engine = Engine("litemedsam")
    alone_engine = Engine("none") if args.registration_alone or warps else None
    results = []
    for t in range(args.first, args.first + args.targets):
        target_name, reference_name = names[t % len(names)], names[(t + args.offset) % len(names)]
        target = read_image(args.data / f"{target_name}_image.nii.gz")
        truth = np.asarray(read_label(args.data / f"{target_name}_label.nii.gz")[0].array)
        ref_label, ref_table = read_label(args.data / f"{reference_name}_label.nii.gz")
        reference = ReferenceCase(read_image(args.data / f"{reference_name}_image.nii.gz"), ref_label, ref_table)
        labels = sorted(int(v) for v in np.unique(ref_label.array) if v)
        cache = args.cache / f"{args.prior}--{target_name}--{reference_name}.npy"
        tick = time.perf_counter()
        if cache.is_file():
            stack = np.load(cache)
            prior_seconds = float("nan")
        else:
            stack = compute_prior(args.prior, reference, target, labels)
            prior_seconds = time.perf_counter() - tick
            np.save(cache, stack)
        frames = make_slice_stack(target)
        prior_volume = frames.to_volume(stack)
        if args.save_labels:
            args.save_labels.mkdir(parents=True, exist_ok=True)
            np.save(args.save_labels / f"{target_name}--{reference_name}--prior.npy", np.asarray(prior_volume.array))
        entry = {"target": target_name, "reference": reference_name, "prior_seconds": prior_seconds,
                 "prior": [dice(np.asarray(prior_volume.array) == v, truth == v) for v in labels], "rows": {}}
        if args.registration_alone:
            tick = time.perf_counter()
            label = np.asarray(alone_engine.segment([reference], target, generator="registration",
                                                    labels=labels).label.array)
            if args.save_labels:
                np.save(args.save_labels / f"{target_name}--{reference_name}--registration alone.npy", label)
            entry["registration_alone"] = {"dice": [dice(label == v, truth == v) for v in labels],
                                           "seconds": time.perf_counter() - tick}
        for row in rows:
            options, rounds = ROWS[row]
            _PRIORS["current"] = stack
            if options.get("prior_box_margin") == FRAME3:  # 3 frame pixels, in the model's 256 px input
                options = {**options, "prior_box_margin": 3.0 * 256 / max(frames.images.shape[1:])}
            tick = time.perf_counter()
            result = engine.segment([reference], target, generator="cached-prior", labels=labels,
                                    options={"warp_prompts": "box", **options},
                                    engine_options=EngineOptions(refinement_rounds=rounds))
            label = np.asarray(result.label.array)
            if args.save_labels:
                np.save(args.save_labels / f"{target_name}--{reference_name}--{row}.npy", label)
            entry["rows"][row] = {"dice": [dice(label == v, truth == v) for v in labels],
                                  "seconds": time.perf_counter() - tick, "rounds": result.info["refinement_rounds"]}
        for row, (warp, model) in whole.items():
            tick = time.perf_counter()
            result = (engine if model == "litemedsam" else alone_engine).segment(
                [reference], target, generator="warp", labels=labels, options={"warp": warp, "warp_prompts": "box"})
            label = np.asarray(result.label.array)
            if args.save_labels:
                np.save(args.save_labels / f"{target_name}--{reference_name}--{row}.npy", label)
            entry["rows"][row] = {"dice": [dice(label == v, truth == v) for v in labels],
                                  "seconds": time.perf_counter() - tick,
                                  "rounds": result.info.get("refinement_rounds")}
        results.append(entry)
        if args.json:  # after every pair: a long run stopped early keeps what it measured
            args.json.write_text(json.dumps({"labels": {str(v): table.get(str(v)) for v in labels},
                                             "pairs": results}, indent=1, default=float))
        print(target_name, reference_name, "prior", round(float(np.mean(entry["prior"])), 3),
              "alone", round(float(np.mean(entry["registration_alone"]["dice"])), 3) if args.registration_alone else "-",
              {r: round(float(np.mean(e["dice"])), 3) for r, e in entry["rows"].items()}, flush=True)
    print(markdown_table(results, rows + list(whole), labels, table, args.prior))
    if args.json:
        args.json.write_text(json.dumps({"labels": {str(v): table.get(str(v)) for v in labels}, "pairs": results},
                                        indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
