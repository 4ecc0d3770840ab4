"""Whole-process latency (issue 17): what a user waits for, from the command to the written file.

Each run is its own process, timed from outside (wall clock from spawn to exit), with its own peak RSS (`os.wait4`).
Configurations, alternated A B A B ... for `--pairs` pairs (medians and the per-pair ratios):

* SAM 2 (sam2.1 hiera tiny, RANDOM weights: the real model's compute, not its accuracy) at each `--sizes` px, ACDC
  (reference patient002_ED -> target patient001_ED, 10 slices, 3 structures):
  A = naive: the stock pipeline as existing extensions run it (write the slices as 8-bit JPEGs with a per-slice
      min-max, `SAM2VideoPredictor.init_state(video_path=folder)`, one ground-truth mask per structure on the
      middle slice (`add_new_mask`), `propagate_in_video` forward then reverse, write the label volume);
  B = ours: `proxyprompt segment --model random --image-size S` (default generator: support-memory).
* Second target from the same reference (SAM 2, largest size): target patient030_ED (same in-plane grid as
  patient001_ED) with an empty feature cache (A) vs after patient001_ED has filled it (B).
* The default LiteMedSAM path (real weights; generator auto, `options.default_generator`): `proxyprompt segment` on ACDC (patient002_ED -> patient001_ED) and
  hippocampus (hippocampus_003 -> hippocampus_001, 35 slices); B only, or A = `--baseline TREE` (another checkout's
  engine, e.g. main before this change) alternated with B.

Per-phase profile of ours, from its JSON summary (`seconds`): imports + interpreter (wall - the engine's total),
read, model build (`build`), reference work (`encode_reference`: the reference slices' encoding, 0 when the
feature cache holds them), target encode (`encode`: only the slices that can hold a structure with a SAM-family
model), plan (`prompts`, generator work less encoding), propagate (less encoding), write (`write_back` + `write`).
`uptime`'s load is recorded before each configuration.

Writes its section of docs/benchmarks.md (between `<!-- latency:start -->` and `<!-- latency:end -->`) unless
`--no-write`; prints it either way.

    .venv/bin/python benchmarks/latency.py                      # full: 3 pairs, 512 and 1024 px, LiteMedSAM
    .venv/bin/python benchmarks/latency.py --pairs 1 --sizes 512 --no-write   # quick, for development
    .venv/bin/python benchmarks/latency.py --device cuda        # on a GPU: + slices/s, 10- and 100-slice volumes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ACDC, HIPPO = DATA / "acdc", DATA / "hippocampus"
DOC = ROOT / "docs" / "benchmarks.md"
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
ACDC_REFERENCE, ACDC_TARGET, ACDC_SECOND = "patient002_ED", "patient001_ED", "patient030_ED"
HIPPO_REFERENCE, HIPPO_TARGET = "hippocampus_003", "hippocampus_001"
TARGETS = {"sam2_512": (1.5, "x naive"), "sam2_1024": (2.0, "x naive"), "lite_acdc": (12.0, "s"),
           "lite_hippocampus": (30.0, "s"), "second_target": (0.25, "faster")}
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import write_section  # noqa: E402


# --- the naive pipeline (its own process) ----------------------------------------------------------------------
def naive_main(args) -> None:
    """Stock SAM 2 JPEG-folder workflow, whole volume; prints one RESULT line with its own phase times."""
    started = time.perf_counter()
    import SimpleITK as sitk
    import torch
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor

    torch.set_num_threads(int(os.environ.get("LATENCY_THREADS", "2")))
    phases = {"imports": time.perf_counter() - started}
    tick = time.perf_counter()
    image = sitk.ReadImage(str(args.target_image))
    label = sitk.ReadImage(str(args.target_label))
    volume = sitk.GetArrayFromImage(image).astype(np.float32)  # [k, j, i]: ACDC slices along k
    truth = sitk.GetArrayFromImage(label)
    values = [int(v) for v in np.unique(truth) if v != 0]
    present = [n for n in range(truth.shape[0]) if all((truth[n] == v).any() for v in values)]
    anchor = present[len(present) // 2]
    phases["read"] = time.perf_counter() - tick
    tick = time.perf_counter()
    side = args.size // 16
    extra = [] if args.size == 1024 else [
        f"++model.image_size={args.size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{side},{side}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{side},{side}]"]
    torch.manual_seed(0)
    predictor = build_sam2_video_predictor(CONFIG, None, device=args.device, hydra_overrides_extra=extra)
    phases["build"] = time.perf_counter() - tick
    tick = time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast(
        "cpu", enabled=False)  # the SAM 2 README's CUDA recipe; on a CPU the stock predictor runs float32
    result = np.zeros(truth.shape, np.uint16)
    with tempfile.TemporaryDirectory() as folder:
        for n, plane in enumerate(volume):  # per-slice min-max to 8 bit, as the existing extensions do
            low, high = float(plane.min()), float(plane.max())
            scaled = np.zeros_like(plane) if high <= low else (plane - low) / (high - low)
            Image.fromarray((scaled * 255).astype(np.uint8)).convert("RGB").save(Path(folder) / f"{n:05d}.jpg")
        phases["jpeg"] = time.perf_counter() - tick
        tick = time.perf_counter()
        with torch.inference_mode(), autocast:
            state = predictor.init_state(video_path=folder)
            phases["encode"] = time.perf_counter() - tick  # init_state loads the frames; sam2 encodes lazily
            tick = time.perf_counter()
            for value in values:
                predictor.add_new_mask(state, anchor, value, truth[anchor] == value)
            for reverse in (False, True):
                for frame, obj_ids, logits in predictor.propagate_in_video(state, start_frame_idx=anchor,
                                                                           reverse=reverse):
                    probabilities = (logits[:, 0] > 0).cpu().numpy()
                    for row, value in enumerate(obj_ids):
                        result[frame][probabilities[row]] = value
    phases["propagate"] = time.perf_counter() - tick
    tick = time.perf_counter()
    out = sitk.GetImageFromArray(result)
    out.CopyInformation(label)
    sitk.WriteImage(out, str(args.output))
    phases["write"] = time.perf_counter() - tick
    print("RESULT " + json.dumps({"seconds": phases, "slices": int(volume.shape[0]), "anchor": anchor}))


# --- one timed process ------------------------------------------------------------------------------------------
def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_process(command, env=None) -> dict:
    """Run `command` as a child process: wall seconds from spawn to exit, its own peak RSS (MB, from `wait4`), and
    the last RESULT / JSON line of its stdout."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True,
                                   env=dict(os.environ, **(env or {})))
        _, status, usage = os.wait4(process.pid, 0)  # reaped here: the child's own resource usage
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({process.returncode}):\n{errors[-3000:]}")
    payload = {}
    for line in output.splitlines()[::-1]:
        line = line.strip()
        if line.startswith("RESULT "):
            payload = json.loads(line[len("RESULT "):])
            break
        if line.startswith("{"):
            payload = json.loads(line)
            break
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024.0, "out": payload}


def ours_command(tree: Path, reference: str, target: str, output: Path, data: Path, extra=()) -> list:
    return [sys.executable, "-m", "proxyprompt.cli", "segment",
            "--reference-image", str(data / f"{reference}_image.nii.gz"),
            "--reference-label", str(data / f"{reference}_label.nii.gz"),
            "--target", str(data / f"{target}_image.nii.gz"), "--output", str(output), "--json", "--quiet", *extra]


def ours_env(tree: Path, home: Path, threads: int) -> dict:
    return {"PYTHONPATH": str(tree / "SlicerProxyPrompt"), "PROXYPROMPT_HOME": str(home),
            "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}


def naive_command(size: int, device: str, target: str, output: Path) -> list:
    return [sys.executable, str(Path(__file__).resolve()), "--naive", "--size", str(size), "--device", device,
            "--target-image", str(ACDC / f"{target}_image.nii.gz"),
            "--target-label", str(ACDC / f"{target}_label.nii.gz"), "--output", str(output)]


def profile(run: dict) -> dict:
    """Per-phase seconds of one of our runs, from its summary; imports = wall - the engine's own total."""
    seconds = run["out"].get("seconds", {})
    phases = {"imports": run["wall"] - seconds.get("total", 0.0), "read": seconds.get("read", 0.0),
              "build": seconds.get("build", 0.0), "reference": seconds.get("encode_reference", 0.0),
              "encode": seconds.get("encode", 0.0), "plan": seconds.get("prompts", 0.0),
              "propagate": seconds.get("propagate", 0.0) + seconds.get("refine", 0.0),
              "write": seconds.get("write_back", 0.0) + seconds.get("write", 0.0) + seconds.get("frames", 0.0)}
    return phases


def median_profile(runs) -> dict:
    profiles = [profile(r) for r in runs]
    return {key: statistics.median(p[key] for p in profiles) for key in profiles[0]}


SAVE = None  # --save: the raw rows so far


def keep(rows) -> None:
    if SAVE is not None:
        SAVE.write_text(json.dumps(rows, default=str, indent=1))


def alternate(pairs: int, run_a, run_b) -> tuple:
    a_runs, b_runs = [], []
    for index in range(pairs):
        if run_a is not None:
            a_runs.append(run_a())
        b_runs.append(run_b())
        print(f"  pair {index + 1}: " + (f"A {a_runs[-1]['wall']:.1f} s, " if run_a is not None else "")
              + f"B {b_runs[-1]['wall']:.1f} s", flush=True)
    return a_runs, b_runs


def summarise(name: str, a_runs, b_runs, load: str, a_name: str, b_name: str) -> dict:
    row = {"name": name, "load": load, "b_median": statistics.median(r["wall"] for r in b_runs),
           "b_rss": max(r["rss_mb"] for r in b_runs), "b_walls": [r["wall"] for r in b_runs],
           "b_profile": median_profile(b_runs) if b_runs[0]["out"].get("seconds") else None,
           "a_name": a_name, "b_name": b_name, "b_out": b_runs[-1]["out"]}
    if a_runs:
        row.update({"a_median": statistics.median(r["wall"] for r in a_runs), "a_rss": max(r["rss_mb"] for r in a_runs),
                    "a_walls": [r["wall"] for r in a_runs],
                    "ratios": [a["wall"] / b["wall"] for a, b in zip(a_runs, b_runs)]})
        row["ratio"] = row["a_median"] / row["b_median"]
        if a_runs[0]["out"].get("seconds") and "total" in a_runs[0]["out"]["seconds"]:
            row["a_profile"] = median_profile(a_runs)
    return row


# --- the report ---------------------------------------------------------------------------------------------
PHASES = ("imports", "read", "build", "reference", "encode", "plan", "propagate", "write")


def verdict(key: str, value: float) -> str:
    bound, unit = TARGETS[key]
    if unit == "s":
        return f"{'met' if value <= bound else 'NOT met'} ({value:.1f} s, target <= {bound:.0f} s)"
    if unit == "faster":
        return f"{'met' if value >= bound else 'NOT met'} ({value * 100:.0f} % faster, target >= {bound * 100:.0f} %)"
    return f"{'met' if value >= bound else 'NOT met'} ({value:.2f}x, target >= {bound:.1f}x)"


def report(rows, args, command: str) -> str:
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, Python "
               f"{platform.python_version()}; device {args.device}, {args.threads} torch threads")
    lines = [
        "## Latency: whole process, naive SAM 2 pipeline vs ProxyPrompt (issue 17)",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Machine: {machine}.",
        "Each run is its own process, timed from spawn to exit (imports, model build, reading, the work, writing the "
        "label file); peak RSS is the process's own (`wait4`). A and B alternate (A B A B ...); `load` is "
        "`/proc/loadavg` (1 / 5 / 15 min) before the configuration: above ~0.5 the machine was shared and the "
        "absolute seconds are pessimistic (the paired ratios less so).",
        "SAM 2 rows: sam2.1 hiera tiny with RANDOM weights (the real model's compute; timings, not accuracy); naive = "
        "JPEG folder + stock `SAM2VideoPredictor` with one ground-truth mask per structure on the middle slice, "
        "propagated both ways; ours = `proxyprompt segment --model random --image-size S` (support-memory from the "
        f"reference {ACDC_REFERENCE}). LiteMedSAM rows: `proxyprompt segment` with its defaults (model auto = "
        "LiteMedSAM, real weights; generator auto = registration, its prior refined by the model where stable; it "
        "was support-memory before session 8: `options.default_generator`).",
        "",
        f"Command: `{command}`",
        "",
        "| configuration | load | A median s | B median s | A / B (per pair) | peak RSS MB A / B | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        a = f"{row['a_median']:.1f}" if "a_median" in row else "-"
        ratio = (f"{row['ratio']:.2f}x ({', '.join(f'{r:.2f}' for r in row['ratios'])})" if "ratio" in row else "-")
        rss = (f"{row['a_rss']:.0f} / " if "a_rss" in row else "- / ") + f"{row['b_rss']:.0f}"
        lines.append(f"| {row['label']} | {row['load']} | {a} | {row['b_median']:.1f} | {ratio} | {rss} | "
                     f"{row.get('verdict', '-')} |")
    lines += ["", "Where the time goes (B, median seconds per phase; imports = interpreter start + imports):", "",
              "| configuration | " + " | ".join(PHASES) + " | encoded slices |",
              "|---|" + "---|" * (len(PHASES) + 1)]
    for row in rows:
        if row.get("b_profile"):
            out = row["b_out"]
            encoded = f"{out.get('encoded_slices', '?')} of {out.get('slices', '?')}"
            lines.append(f"| {row['label']} (B) | " + " | ".join(f"{row['b_profile'][p]:.1f}" for p in PHASES)
                         + f" | {encoded} |")
        if row.get("a_profile"):
            lines.append(f"| {row['label']} (A) | " + " | ".join(f"{row['a_profile'][p]:.1f}" for p in PHASES)
                         + " | |")
    for row in rows:
        if row.get("naive_phases"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in row["naive_phases"].items())
            lines.append(f"\nNaive pipeline phases ({row['label']}, last run, s): {parts}.")
    for row in rows:
        if row["name"] == "sam2_1024":
            rss_ok = row["b_rss"] <= row["a_rss"]
            lines.append(f"\nPeak RSS at 1024 px, ours {row['b_rss']:.0f} MB vs naive {row['a_rss']:.0f} MB: "
                         f"{'met' if rss_ok else 'NOT met'} (target: no higher than naive).")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--second-size", type=int, help="image size of the second-target rows (default: the largest)")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of every run")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sam2", "second", "litemedsam"])
    parser.add_argument("--baseline", type=Path, help="another checkout: LiteMedSAM rows alternate its engine (A) "
                                                       "with this one (B)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose engine is 'ours'")
    parser.add_argument("--memory-sweep", type=int, nargs="*", default=[],
                        help="SAM 2 at the largest size with --max-support K (attention top-k min(K, 4)) for each K: "
                             "the time side of bounding the conditioning memories (random weights: no accuracy side)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--report-only", type=Path, nargs="+", metavar="JSON",
                        help="no runs: the section from rows kept by --save (one or more files, in order)")
    parser.add_argument("--command", help="with --report-only: the command(s) that measured the rows, for the text")
    parser.add_argument("--save", type=Path, help="also keep the raw rows here (JSON, rewritten after each configuration)")
    # the naive worker
    parser.add_argument("--naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--target-image", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--target-label", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive:
        naive_main(args)
        return
    if args.report_only:
        rows = [row for path in args.report_only for row in json.loads(Path(path).read_text())]
        text = report(rows, args, args.command or "python benchmarks/latency.py " + " ".join(sys.argv[1:]))
        if not args.no_write:
            write_section(DOC, "latency", text)
        print(text)
        return
    args.notes = []
    global SAVE
    SAVE = args.save
    threads = args.threads
    work = Path(tempfile.mkdtemp(prefix="latency-"))
    home = work / "home"  # a feature cache of this benchmark's own (cleared where a row needs it cold)
    rows = []
    try:
        if "sam2" not in args.skip:
            for size in args.sizes:
                load = load_average()
                print(f"SAM 2 {size} px (load {load})", flush=True)
                extra = ["--model", "random", "--image-size", str(size), "--device", args.device]

                def run_naive(size=size):
                    return run_process(naive_command(size, args.device, ACDC_TARGET, work / "naive.nii.gz"),
                                       {"LATENCY_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})

                def run_ours(extra=extra):
                    shutil.rmtree(home / "features", ignore_errors=True)  # first target: nothing cached
                    return run_process(ours_command(args.tree, ACDC_REFERENCE, ACDC_TARGET, work / "ours.nii.gz", ACDC,
                                                    extra), ours_env(args.tree, home, threads))

                a_runs, b_runs = alternate(args.pairs, run_naive, run_ours)
                row = summarise(f"sam2_{size}", a_runs, b_runs, load, "naive", "ours")
                row["label"] = f"SAM 2 {size} px, ACDC 10 slices, 3 structures: A naive, B ours"
                row["naive_phases"] = a_runs[-1]["out"].get("seconds")
                if size in (512, 1024):
                    row["verdict"] = verdict(f"sam2_{size}", row["ratio"])
                rows.append(row)
                keep(rows)
        if "second" not in args.skip:
            size = args.second_size or max(args.sizes)
            load = load_average()
            print(f"second target, SAM 2 {size} px (load {load})", flush=True)
            extra = ["--model", "random", "--image-size", str(size), "--device", args.device]
            env = ours_env(args.tree, home, threads)

            def cold():
                shutil.rmtree(home / "features", ignore_errors=True)
                return run_process(ours_command(args.tree, ACDC_REFERENCE, ACDC_SECOND, work / "second.nii.gz", ACDC,
                                                extra), env)

            def warm():
                shutil.rmtree(home / "features", ignore_errors=True)
                run_process(ours_command(args.tree, ACDC_REFERENCE, ACDC_TARGET, work / "first.nii.gz", ACDC, extra),
                            env)  # the first target fills the cache (not timed)
                return run_process(ours_command(args.tree, ACDC_REFERENCE, ACDC_SECOND, work / "second.nii.gz", ACDC,
                                                extra), env)

            a_runs, b_runs = alternate(args.pairs, cold, warm)
            row = summarise("second_target", a_runs, b_runs, load, "cold", "warm")
            row["label"] = (f"second target from the same reference, SAM 2 {size} px ({ACDC_SECOND}): A feature cache "
                            f"empty, B filled by {ACDC_TARGET}")
            row["verdict"] = verdict("second_target", 1.0 - row["b_median"] / row["a_median"])
            rows.append(row)
            keep(rows)
        if "litemedsam" not in args.skip:
            for key, data, reference, target, label in (
                    ("lite_acdc", ACDC, ACDC_REFERENCE, ACDC_TARGET, "LiteMedSAM default path, ACDC 10 slices"),
                    ("lite_hippocampus", HIPPO, HIPPO_REFERENCE, HIPPO_TARGET,
                     "LiteMedSAM default path, hippocampus 35 slices")):
                load = load_average()
                print(f"{label} (load {load})", flush=True)
                extra = ["--device", args.device]

                def run_tree(tree, data=data, reference=reference, target=target, extra=extra):
                    return lambda: run_process(ours_command(tree, reference, target, work / "lite.nii.gz", data, extra),
                                               ours_env(tree, home, threads))

                a_runs, b_runs = alternate(args.pairs, run_tree(args.baseline) if args.baseline else None,
                                           run_tree(args.tree))
                row = summarise(key, a_runs, b_runs, load, "baseline", "ours")
                row["label"] = label + (f": A {args.baseline}, B this checkout" if args.baseline else ": B ours")
                row["verdict"] = verdict(key, row["b_median"])
                rows.append(row)
                keep(rows)
        if args.memory_sweep:
            rows += memory_sweep(args, work, home, threads)
        if args.device == "cuda":
            rows += cuda_rows(args, work, home, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/latency.py " + " ".join(
        [f"--pairs {args.pairs}", "--sizes " + " ".join(map(str, args.sizes)), f"--device {args.device}"]
        + ([f"--skip {' '.join(args.skip)}"] if args.skip else [])
        + ([f"--second-size {args.second_size}"] if args.second_size else [])
        + ([f"--baseline {args.baseline}"] if args.baseline else [])
        + (["--memory-sweep " + " ".join(map(str, args.memory_sweep))] if args.memory_sweep else []))
    text = report(rows, args, command)
    print(json.dumps(rows, default=str, indent=1))
    if not args.no_write:
        write_section(DOC, "latency", text)
    print(text)


def memory_sweep(args, work: Path, home: Path, threads: int) -> list:
    """Ours at the largest size with at most K reference slices as conditioning memory (each attended by every target
    slice when K <= 4): whole-process time and its propagate / reference phases, one run each per pair."""
    rows = []
    size = max(args.sizes)
    for support in args.memory_sweep:
        load = load_average()
        extra = ["--model", "random", "--image-size", str(size), "--device", args.device, "--max-support", str(support),
                 "--attention-top-k", str(min(support, 4))]

        def run(extra=extra):
            shutil.rmtree(home / "features", ignore_errors=True)
            return run_process(ours_command(args.tree, ACDC_REFERENCE, ACDC_TARGET, work / "sweep.nii.gz", ACDC, extra),
                               ours_env(args.tree, home, threads))

        _, runs = alternate(args.pairs, None, run)
        row = summarise(f"sweep_{support}", [], runs, load, "-", "ours")
        row["label"] = f"SAM 2 {size} px, ours with --max-support {support} --attention-top-k {min(support, 4)}"
        rows.append(row)
    return rows


def cuda_rows(args, work: Path, home: Path, threads: int) -> list:
    """GPU (issue 17 item 6): sam2.1 tiny at 1024 px, one structure, bf16: slices per second of the engine's
    encode + propagate, and whole-volume latency for a 10- and a 100-slice volume (the ACDC target's slices
    repeated to 100)."""
    import SimpleITK as sitk

    rows = []
    image = sitk.ReadImage(str(ACDC / f"{ACDC_TARGET}_image.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    for count in (10, 100):
        stacked = np.concatenate([array] * int(np.ceil(count / array.shape[0])))[:count]
        volume = sitk.GetImageFromArray(stacked)
        volume.SetSpacing(image.GetSpacing())
        path = work / f"cuda_{count}_image.nii.gz"
        sitk.WriteImage(volume, str(path))
        extra = ["--model", "random", "--image-size", "1024", "--device", "cuda", "--labels", "3"]
        command = [sys.executable, "-m", "proxyprompt.cli", "segment", "--reference-image",
                   str(ACDC / f"{ACDC_REFERENCE}_image.nii.gz"), "--reference-label",
                   str(ACDC / f"{ACDC_REFERENCE}_label.nii.gz"), "--target", str(path), "--output",
                   str(work / "cuda_out.nii.gz"), "--json", "--quiet", *extra]
        load = load_average()
        runs = [run_process(command, ours_env(args.tree, home, threads)) for _ in range(max(args.pairs, 1))]
        row = summarise(f"cuda_{count}", [], runs, load, "-", "ours")
        seconds = [r["out"]["seconds"] for r in runs]
        per_second = statistics.median(count / (s["encode"] + s["propagate"]) for s in seconds)
        row["label"] = (f"CUDA bf16, SAM 2 1024 px, 1 structure, {count} slices ({per_second:.0f} slices/s in encode + "
                        "propagate; target >= 60)")
        row["verdict"] = f"{'met' if per_second >= 60 else 'NOT met'} ({per_second:.0f} slices/s)"
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
