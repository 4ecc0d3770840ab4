"""Accuracy and speed of the registration (classic atlas) path on ACDC, one-shot cross-patient.

For every ordered pair (reference patient != target patient) of the chosen patients, per phase
(ED -> ED, ES -> ES), it measures mean 3D Dice per structure of:

* copy: the reference label resampled onto the target grid with the identity transform (physical space)
* copy, centred: the same after a translation that aligns the two image centres
* located: NCC template search only (stage 1)
* affine: located + masked affine refinement (stages 1-2)
* deformable: located + affine + demons (stages 1-3) = `register_case(method="deformable")`
* intensity: stages 1-3 + the atlas-prior intensity EM (`proxyprompt.intensity`) =
  `register_case(method="intensity")`, the default one-reference result
* fusion of 3 references: 3 random other patients (vote); the 3 most similar of all the other patients
  (vote, STAPLE, mean of soft maps); the vote of all the others

Stages 1-3 come from one `register_case(..., keep_stages=True)` call: their seconds are cumulative.
Fusion rows: seconds per target = the registrations they need + the fusion.

Writes its own section of docs/benchmarks.md, between ``<!-- registration:start -->`` and
``<!-- registration:end -->`` (created if missing; other sections are left as they are).

    .venv/bin/python benchmarks/registration.py --data ../shared/data/acdc --patients 10 --phases ED ES
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import write_section  # noqa: E402

from proxyprompt.registration import DEFAULT_SETTINGS, fuse_registered, register_case  # noqa: E402
from proxyprompt.volume import read_image, read_label  # noqa: E402

START, END = "<!-- registration:start -->", "<!-- registration:end -->"
LOAD_AT_START = os.getloadavg()[0]  # other jobs on the machine inflate the seconds
STRUCTURES = {1: "RV", 2: "MYO", 3: "LV"}
ONE_REFERENCE = "located + affine + demons + intensity EM (one reference, default)"


def dice(prediction: np.ndarray, truth: np.ndarray, value: int) -> float:
    """Dice of one label value (`proxyprompt.metrics.dice`: 1.0 when both are empty)."""
    from proxyprompt.metrics import dice as metric

    return metric(prediction == value, truth == value)


def scores(prediction: np.ndarray, truth: np.ndarray) -> list:
    values = [dice(prediction, truth, v) for v in STRUCTURES]
    return values + [float(np.mean(values))]


def patients(data: Path):
    return sorted({p.name.split("_")[0] for p in data.glob("patient*_ED_image.nii.gz")})


def run_phase(data: Path, ids, phase: str, max_pairs, candidates: int, seed: int, log):
    cases = {}
    for pid in ids:
        image = read_image(data / f"{pid}_{phase}_image.nii.gz")
        label, _ = read_label(data / f"{pid}_{phase}_label.nii.gz")
        cases[pid] = (image, label)
    rows = {}  # method -> list of (scores..., seconds)
    pairs_done = 0
    rng = random.Random(seed)
    targets = list(ids)
    for target in targets:
        others = [r for r in ids if r != target]
        if max_pairs is not None and pairs_done + len(others) > max_pairs and pairs_done > 0:
            break
        truth = cases[target][1].array
        results, demons_only = {}, {}
        for reference in others:
            ref_image, ref_label = cases[reference]
            for method, name in (("copy", "copy (identity, physical space)"),
                                 ("centred", "copy, image centres aligned")):
                result = register_case(ref_image, ref_label, cases[target][0], method)
                rows.setdefault(name, []).append(scores(result.label.array, truth) + [result.seconds])
            result = register_case(ref_image, ref_label, cases[target][0], "intensity", keep_stages=True)
            for stage, name in (("located", "located (NCC template search)"),
                                ("affine", "located + affine"),
                                ("deformable", "located + affine + demons"),
                                ("intensity", ONE_REFERENCE)):
                label, seconds = result.stages[stage]
                rows.setdefault(name, []).append(scores(label.array, truth) + [seconds])
            results[reference] = result
            # the same registration without the intensity stage, for the fusion comparison row
            demons_only[reference] = replace(result, label=result.stages["deformable"][0])
            pairs_done += 1
            log(f"{phase} {reference} -> {target}: mean Dice demons {rows['located + affine + demons'][-1][3]:.3f}, "
                f"+ intensity {rows[ONE_REFERENCE][-1][3]:.3f} in {result.seconds:.1f} s")

        def fused(name, chosen_refs, fusion, top_k, timed_refs, select="agreement", source=None):
            start = time.perf_counter()
            source = results if source is None else source
            label, _ = fuse_registered([source[r] for r in chosen_refs], fusion, top_k, cleanup=True, select=select)
            seconds = time.perf_counter() - start + sum(results[r].seconds for r in timed_refs)
            rows.setdefault(name, []).append(scores(label.array, truth) + [seconds])

        pool = others[:candidates] if candidates < len(others) else others
        random_three = rng.sample(others, min(3, len(others)))
        n = len(pool)
        fused("vote of 3 random references", random_three, "vote", None, random_three)
        fused(f"vote of the 3 most similar (image NCC) of {n}", pool, "vote", 3, pool, "similarity")
        fused(f"vote of the 3 best by label agreement of {n} (default)", pool, "vote", 3, pool)
        fused(f"vote of the 3 best by label agreement of {n}, demons labels (no intensity stage)", pool, "vote", 3,
              pool, source=demons_only)
        fused(f"STAPLE of the 3 best by label agreement of {n}", pool, "staple", 3, pool)
        fused(f"mean soft maps of the 3 best by label agreement of {n}", pool, "mean", 3, pool)
        fused(f"vote of all {n}", pool, "vote", None, pool)
    return rows, pairs_done


def summarise(rows):
    table = {}
    for name, values in rows.items():
        array = np.asarray(values, dtype=float)
        table[name] = {
            "n": len(values),
            "mean": array[:, :4].mean(axis=0).tolist(),
            "median": np.median(array[:, :4], axis=0).tolist(),
            "seconds": float(array[:, 4].mean()),
        }
    return table


def targets_line(summary) -> str:
    """The issue's targets (ED): one reference mean >= 0.60 with LV >= 0.72; fusion of 3 >= 0.68; <= 5 s / pair."""
    table = summary.get("ED", {})
    one = table.get(ONE_REFERENCE)
    fused = next((row for name, row in table.items() if name.endswith("(default)")), None)
    if one is None or fused is None:
        return "Targets: not evaluated (ED rows missing)."
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    one_ok = one["mean"][3] >= 0.60 and one["mean"][2] >= 0.72
    return (f"Targets on ED: one reference >= 0.60 mean with LV >= 0.72: {verdict(one_ok)} ({one['mean'][3]:.3f}, "
            f"LV {one['mean'][2]:.3f}); fusion of 3 >= 0.68: {verdict(fused['mean'][3] >= 0.68)} "
            f"({fused['mean'][3]:.3f}); <= 5 s per pair: {verdict(one['seconds'] <= 5.0)} ({one['seconds']:.2f} s).")


def markdown(summary, args, ids, pairs, elapsed):
    lines = [START, "## Registration (classic atlas, no GPU, no weights)", ""]
    lines.append(
        f"Date: {datetime.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores "
        f"(load average {LOAD_AT_START:.1f} when the run started), SimpleITK {sitk.Version.VersionString()}, "
        f"{args.threads} SimpleITK thread(s), Python {platform.python_version()}. Wall time {elapsed / 60:.1f} min."
    )
    lines.append("")
    lines.append(f"Command: `cd {REPO} && {' '.join(['.venv/bin/python', 'benchmarks/registration.py'] + sys.argv[1:])}`")
    lines.append("")
    lines.append(
        f"Data: ACDC, {len(ids)} patients ({ids[0]} … {ids[-1]}), one-shot cross-patient: every ordered pair "
        f"reference ≠ target, same phase (ED→ED, ES→ES); 3D Dice on the target grid, mean / median over "
        f"{', '.join(f'{p}: {n} pairs' for p, n in pairs.items())}. Fusion rows: per target, over the other patients "
        "(candidates = all the other patients of the set; 'most similar' = ranked by "
        "`RegisteredCase.similarity`, the masked NCC after the affine stage; 'label agreement' = ranked by the "
        "mean Dice of each warped reference label with the other warped labels, `rank_references(select="
        "'agreement')`), largest-component clean-up, seconds per target including all the registrations used."
    )
    lines.append(
        "Settings: `proxyprompt.registration.DEFAULT_SETTINGS` — "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_SETTINGS.__dict__.items() if k != "intensity")
        + "; intensity stage: `proxyprompt.intensity.DEFAULT_INTENSITY_SETTINGS` — "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_SETTINGS.intensity.__dict__.items())
        + ". Most knobs were chosen by mean Dice on pairs of patient059 … patient087 (ED and ES); the search "
        "scales, template margin and candidate count then on ED pairs of patient001 … patient045 (checked for no "
        "loss on patient059 … patient087). The intensity stage's settings were set on 60 random ED pairs of all 20 "
        "shared patients (mean Dice 0.573 there; variants of prior smoothing, prior power, prior floor, iterations "
        "and bins gave 0.565-0.577), its slice-axis re-fit (rounds, floor, spread rather than volume) on 90 random "
        "ED pairs of all 20 (0.572 -> 0.600; fitting the in-plane axes too gave 0.569-0.615 depending on the axes, "
        "no principled choice among them). So the ED rows below are not held out; the ES rows had no say in any "
        "setting. The same settings for both phases."
    )
    lines.append("")
    lines.append(
        "Read with care: ACDC numbers patients by group (001-020 dilated cardiomyopathy, 021-040 hypertrophic, "
        "041-060 previous infarction, 061-080 normal, 081-100 abnormal right ventricle). Cross-group pairs (DCM vs "
        "HCM, very different heart sizes; at ES the HCM cavity nearly closes) are where one reference fails, often "
        "completely (Dice 0 when the search locks onto another structure); ranking the references by label "
        "agreement and fusing the best 3 recovers much of it."
    )
    for phase, table in summary.items():
        lines += ["", f"**{phase}** (mean / median)", "",
                  "| method | RV | MYO | LV | mean | s per pair | n |", "|---|---|---|---|---|---|---|"]
        for name, row in table.items():
            cells = [f"{m:.3f} / {d:.3f}" for m, d in zip(row["mean"], row["median"])]
            unit = "per target" if any(w in name for w in ("vote", "STAPLE", "mean soft")) else ""
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['seconds']:.2f} {unit}".rstrip()
                         + f" | {row['n']} |")
    lines += ["", targets_line(summary)]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "acdc")
    parser.add_argument("--patients", type=int, default=10, help="use the first N patients (sorted)")
    parser.add_argument("--offset", type=int, default=0, help="skip the first OFFSET patients")
    parser.add_argument("--phases", nargs="+", default=["ED", "ES"], choices=["ED", "ES"])
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="stop after about this many pairs per phase (whole targets, so that fusion is complete)")
    parser.add_argument("--candidates", type=int, default=99, help="references ranked for 'most similar' fusion")
    parser.add_argument("--threads", type=int, default=2, help="SimpleITK threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the '3 random references' choice")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md as is")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"data folder not found: {args.data}")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    ids = patients(args.data)[args.offset: args.offset + args.patients]
    if len(ids) < 2:
        parser.error("need at least 2 patients")
    start = time.perf_counter()
    summary, pairs = {}, {}
    for phase in args.phases:
        rows, pairs[phase] = run_phase(args.data, ids, phase, args.max_pairs, args.candidates, args.seed,
                                       lambda message: print(message, flush=True))
        summary[phase] = summarise(rows)
    section = markdown(summary, args, ids, pairs, time.perf_counter() - start)
    if not args.no_write:
        write_section(args.output, "registration", section)
    if args.json:
        args.json.write_text(json.dumps({"pairs": pairs, "summary": summary}, indent=1))
    print(section)


if __name__ == "__main__":
    main()
