"""One-shot / few-shot registration accuracy per anatomy (issue 16): any data folder of ``*_image.nii.gz`` +
``*_label.nii.gz`` (+ ``labels.json``).

For target i (cases sorted by name) the references are the cases i+offset, i+offset+1, ... (cyclic). Per pair the
registration candidates (`proxyprompt.registration_candidates.build_candidates`: locate-first, geometry- and
moments-centred textbook pipelines) are computed once, and the rows are derived from them:

* textbook: geometry-centred AffineTransform initialiser, Mattes MI affine (2 levels), demons on histogram-matched
  images (the `geometry` candidate alone);
* locate-first + intensity EM: the previous default of `--generator registration --model none`;
* candidates chosen by evidence (deformable): `registration_candidates.conclude(..., "deformable")`;
* candidates chosen by evidence + gated intensity EM: the new default (`conclude(..., "intensity")`);
* best candidate (oracle, uses the truth): the ceiling of the choice;
* K references: the previous and the new default per reference, fused as the generator does (label agreement
  ranking, vote, largest component).

It also reports how well the per-structure quality estimate (`proxyprompt.quality`) ranks the results: Pearson and
Spearman correlation of the new default's quality score with its true Dice, over (pair, structure).

    .venv/bin/python benchmarks/oneshot.py --data ../shared/data/hippocampus --targets 20 --offset 2
    .venv/bin/python benchmarks/oneshot.py --data ../shared/data/acdc --glob '*_ED_image.nii.gz' --targets 20 --offset 2
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
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import write_section  # noqa: E402

from proxyprompt.intensity import contrast_separability, refine_by_intensity  # noqa: E402
from proxyprompt.metrics import dice  # noqa: E402
from proxyprompt.quality import LOW_QUALITY  # noqa: E402
from proxyprompt.registration import (  # noqa: E402
    DEFAULT_SETTINGS, RegisteredCase, fixed_threads, fuse_registered, fused_quality,
)
from proxyprompt.registration_candidates import (  # noqa: E402
    INTENSITY_MIN_SEPARABILITY, build_candidates, conclude,
)
from proxyprompt.volume import read_image, read_label  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
TEXTBOOK = "textbook (geometry-centred Mattes MI affine, 2 levels + demons)"
LOCATE = "locate-first + intensity EM (previous default)"
CHOSEN = "candidates chosen by evidence, deformable"
ROBUST = "candidates chosen by evidence + gated intensity EM (default)"
ORACLE = "best candidate (oracle: chosen with the truth)"


def case_names(data: Path, pattern: str):
    names = sorted(p.name[: -len("_image.nii.gz")] for p in data.glob(pattern))
    return [n for n in names if (data / f"{n}_label.nii.gz").is_file()]


def per_label_dice(label: np.ndarray, truth: np.ndarray, values):
    return [float(dice(label == v, truth == v)) for v in values]


def summarise(rows, values, names):
    lines = ["| method | " + " | ".join(names[v] for v in values) + " | mean | s per pair | n |",
             "|---" * (len(values) + 4) + "|"]
    for method, entries in rows.items():
        scores = np.asarray([e["dice"] for e in entries])
        means = scores.mean(axis=1)
        cells = [f"{scores[:, i].mean():.3f} / {np.median(scores[:, i]):.3f}" for i in range(len(values))]
        seconds = np.mean([e["seconds"] for e in entries])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {means.mean():.3f} / {np.median(means):.3f} | "
                     f"{seconds:.1f} | {len(entries)} |")
    return "\n".join(lines)


def header(title: str, script: str, argv, started: float, load: float) -> str:
    """Title, date, machine, load, wall time and the command of a benchmark section."""
    command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    return (f"## {title}\n\nDate: {time.strftime('%Y-%m-%d')}. Machine: {platform.machine()}, {os.cpu_count()} CPU "
            f"cores shared (load average {load:.1f} at the start), SimpleITK {sitk.Version_VersionString()} "
            f"(registration on 1 thread, `fixed_threads`). Wall time {(time.perf_counter() - started) / 60:.1f} min."
            f"\n\nCommand: `{command}`\n\n")


def spearman(x, y) -> float:
    rank = lambda a: np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)  # noqa: E731
    return float(np.corrcoef(rank(np.asarray(x)), rank(np.asarray(y)))[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--glob", default="*_image.nii.gz", help="which images are cases (e.g. '*_ED_image.nii.gz')")
    parser.add_argument("--targets", type=int, default=20, help="first N cases (sorted) are targets")
    parser.add_argument("--first", type=int, default=0, help="index of the first target")
    parser.add_argument("--offset", type=int, default=2, help="references of target i: i+offset, i+offset+1, ...")
    parser.add_argument("--references", type=int, default=3, help="K for the K-reference rows (1 = none)")
    parser.add_argument("--section", default=None, help="section name in docs/benchmarks.md (default: the folder)")
    parser.add_argument("--json", type=Path, help="also write the per-pair rows here")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--calibration", action="store_true",
                        help="also run the intensity stage on every candidate (per-pair JSON, to choose settings)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    names = case_names(args.data, args.glob)
    table_path = args.data / "labels.json"
    label_names = {int(k): v for k, v in json.loads(table_path.read_text()).items()} if table_path.is_file() else {}
    cache = {}

    def load(name):
        if name not in cache:
            label, _ = read_label(args.data / f"{name}_label.nii.gz")
            cache[name] = (read_image(args.data / f"{name}_image.nii.gz"), label)
        return cache[name]

    values = None
    rows = {m: [] for m in (TEXTBOOK, LOCATE, CHOSEN, ROBUST, ORACLE)}
    k = args.references
    fused_rows = {f"{k} references, previous default (locate-first + EM, fused)": [],
                  f"{k} references, default (candidates + gated EM, fused)": []} if k > 1 else {}
    quality_pairs, quality_pairs_k, choices, per_pair = [], [], {}, []
    for t in range(args.first, args.first + args.targets):
        target_name = names[t % len(names)]
        if len(cache) > 8:
            cache.clear()
        target_image, target_label = load(target_name)
        truth = np.asarray(target_label.array)
        values = values or sorted(int(v) for v in np.unique(truth) if v)
        robust_cases, locate_cases, robust_seconds, locate_seconds = [], [], 0.0, 0.0
        for r in range(max(k, 1)):
            reference_name = names[(t + args.offset + r) % len(names)]
            reference_image, reference_label = load(reference_name)
            tick = time.perf_counter()
            built, evidence = build_candidates(reference_image, reference_label, target_image)
            build_seconds = time.perf_counter() - tick
            by_name = {c.name: c for c in built}
            robust = conclude(target_image, built, evidence, "intensity")
            chosen_deformable = conclude(target_image, built, evidence, "deformable")
            tick = time.perf_counter()
            with fixed_threads():
                em_label, em_probabilities = refine_by_intensity(target_image, by_name["locate"].probabilities,
                                                                 DEFAULT_SETTINGS.intensity)
            em_seconds = time.perf_counter() - tick
            locate_case = RegisteredCase(target_image.with_array(em_label), em_probabilities, 0.0,
                                         by_name["locate"].seconds + em_seconds, "intensity")
            locate_case.similarity = by_name["locate"].locate_info.get("affine_score", 0.0)
            robust_cases.append(robust)
            locate_cases.append(locate_case)
            robust_seconds += build_seconds + robust.seconds
            locate_seconds += locate_case.seconds
            if r:
                continue
            candidate_dice = {c.name: per_label_dice(c.label, truth, values) for c in built}
            candidate_dice_em, separability = {}, {}
            for c in (built if args.calibration else []):
                with fixed_threads():
                    refined, _ = refine_by_intensity(target_image, c.probabilities, DEFAULT_SETTINGS.intensity)
                candidate_dice_em[c.name] = per_label_dice(refined, truth, values)
                separability[c.name] = contrast_separability(target_image, c.label)
            best = max(candidate_dice, key=lambda n: np.mean(candidate_dice[n]))
            rows[TEXTBOOK].append({"dice": candidate_dice["geometry"], "seconds": by_name["geometry"].seconds})
            rows[LOCATE].append({"dice": per_label_dice(em_label, truth, values), "seconds": locate_case.seconds})
            rows[CHOSEN].append({"dice": per_label_dice(chosen_deformable.label.array, truth, values),
                                 "seconds": build_seconds})
            robust_dice = per_label_dice(robust.label.array, truth, values)
            rows[ROBUST].append({"dice": robust_dice, "seconds": build_seconds + robust.seconds})
            rows[ORACLE].append({"dice": candidate_dice[best], "seconds": build_seconds})
            quality = fused_quality([robust], [0], robust.label)
            quality_pairs += [(quality[v]["score"], d) for v, d in zip(values, robust_dice)]
            key = (robust.info["chosen_candidate"], robust.info["intensity_kept"])
            choices.setdefault(key, []).append(f"{target_name}<-{reference_name}")
            per_pair.append({"target": target_name, "reference": reference_name, "evidence": evidence,
                             "candidate_dice": candidate_dice, "candidate_dice_em": candidate_dice_em,
                             "separability": separability, "robust_dice": robust_dice,
                             "chosen": robust.info["chosen_candidate"], "intensity_kept": robust.info["intensity_kept"],
                             "truth_separability": contrast_separability(target_image, truth), "quality": quality})
            if args.json:  # after every pair: a long run cut short keeps what it has
                args.json.write_text(json.dumps(per_pair, default=float, indent=1))
            print(target_name, reference_name, {n: round(float(np.mean(d)), 3) for n, d in candidate_dice.items()},
                  "chosen", robust.info["chosen_candidate"], "EM run" if robust.info["intensity_kept"] else "EM skipped",
                  round(float(np.mean(robust_dice)), 3), "locate+EM", round(float(np.mean(rows[LOCATE][-1]["dice"])), 3),
                  flush=True)
        if k > 1:
            for (name, entries), cases, seconds in zip(fused_rows.items(), (locate_cases, robust_cases),
                                                       (locate_seconds, robust_seconds)):
                tick = time.perf_counter()
                fused, fused_info = fuse_registered(cases, "vote", None, True, "agreement")
                fused_dice = per_label_dice(fused.array, truth, values)
                entries.append({"dice": fused_dice, "seconds": seconds + time.perf_counter() - tick})
                if cases is robust_cases:
                    quality = fused_quality(cases, fused_info["chosen"], fused)
                    quality_pairs_k += [(quality[v]["score"], d) for v, d in zip(values, fused_dice)]
            print(target_name, "fused", {n: round(float(np.mean(e[-1]["dice"])), 3) for n, e in fused_rows.items()},
                  flush=True)

    names_by_value = {v: label_names.get(v, str(v)) for v in values}
    rows.update(fused_rows)
    table = summarise(rows, values, names_by_value)
    q = np.asarray(quality_pairs)
    low = q[:, 0] < LOW_QUALITY
    correlation = (f"quality score vs true Dice over {len(q)} (pair, structure) of the one-reference default: "
                   f"Pearson {np.corrcoef(q[:, 0], q[:, 1])[0, 1]:.2f}, Spearman {spearman(q[:, 0], q[:, 1]):.2f}; "
                   f"structures with quality < {LOW_QUALITY} (warned): {int(low.sum())}, their mean Dice "
                   f"{q[low, 1].mean() if low.any() else float('nan'):.3f} (others "
                   f"{q[~low, 1].mean() if (~low).any() else float('nan'):.3f})")
    if quality_pairs_k:
        qk = np.asarray(quality_pairs_k)
        correlation += (f"; {k}-reference default: Pearson {np.corrcoef(qk[:, 0], qk[:, 1])[0, 1]:.2f}, "
                        f"Spearman {spearman(qk[:, 0], qk[:, 1]):.2f}")
    choice_text = "; ".join(f"{c} + EM {'run' if kept else 'skipped'}: {len(p)} ({', '.join(p)})"
                            for (c, kept), p in sorted(choices.items()))
    section = args.section or f"oneshot-{args.data.name}"
    text = (header(f"One-shot registration per anatomy: {args.data.name}", "oneshot.py", argv, started, load_at_start)
            + f"Pairs: targets {names[args.first % len(names)]} ... (cases {args.first}..{args.first + args.targets - 1} "
            f"of {len(names)} sorted), references at offset {args.offset}{f'..{args.offset + k - 1}' if k > 1 else ''} "
            f"(cyclic). Dice per structure mean / median; `s per pair`: wall seconds on a shared, loaded CPU (the "
            f"candidate rows share one computation). Intensity gate: the EM runs when the most distinct structure's "
            f"contrast separability is >= {INTENSITY_MIN_SEPARABILITY}.\n\n{table}\n\n"
            f"Quality estimate: {correlation}.\n\nChoices per pair (one reference): {choice_text}.\n")
    print(text)
    if not args.no_write:
        write_section(DOC, section, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
