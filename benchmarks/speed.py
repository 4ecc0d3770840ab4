"""Speed benchmark (issue 3 item 8): the naive JPEG-folder SAM 2 workflow vs ours, first run and re-run.

One ACDC volume with 3 structures, the same model (sam2.1 hiera tiny architecture; random weights have the
real model's compute), on this machine, at 1024 and 512 px:
  (a) naive: slices written as 8-bit JPEGs (per-slice min-max, as existing extensions do), stock
      `SAM2VideoPredictor.init_state(video_path=folder)`, `add_new_mask` per structure on the middle slice,
      `propagate_in_video` forward then reverse;
  (b) ours, first run: `Engine.segment` with a mask-on-a-frame plan (the same middle-slice masks), at the
      engine's default precision (`--precision auto`: bf16 autocast on CUDA and on CPUs with Intel AMX;
      float32 elsewhere);
  (b') the same at the other precision (fp32 where auto chose bf16, bf16 where it chose fp32), so the table
      shows what the choice gains on this CPU;
  (c) ours, re-run after one corrected slice (same Engine: cached image features; incremental: only the
      frames downstream of the corrected slice are re-tracked, the others keep the first run's output).
Each configuration runs in its own subprocess, so its peak RSS is its own. Writes only the section between
`<!-- speed:start -->` and `<!-- speed:end -->` of docs/benchmarks.md; table rows of sizes not re-run this time
are kept from the section already there (and flagged as such).

    .venv/bin/python benchmarks/speed.py [--slices 10] [--sizes 1024 512] [--case patient001_ED]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "acdc"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- speed:start -->", "<!-- speed:end -->"
LABELS = (1, 2, 3)
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
sys.path.insert(0, str(ROOT / "SlicerProxyPrompt"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _report import write_section  # noqa: E402
from proxyprompt.models.base import cpu_has_amx, select_precision  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def load(case: str, slices: int):
    from proxyprompt.frames import make_slice_stack
    from proxyprompt.volume import Volume, read_image, read_label

    image = read_image(DATA / f"{case}_image.nii.gz")
    label, table = read_label(DATA / f"{case}_label.nii.gz")
    if image.array.shape[0] < slices and case.endswith("_ED"):  # RSS check: ED + ES slices stacked (ACDC has <= 11)
        other = case[:-3] + "_ES"
        image = Volume(np.concatenate([image.array, read_image(DATA / f"{other}_image.nii.gz").array]), image.ijk_to_lps)
        label = Volume(np.concatenate([label.array, read_label(DATA / f"{other}_label.nii.gz")[0].array]),
                       label.ijk_to_lps)
    if image.array.shape[0] > slices:
        image = Volume(np.ascontiguousarray(image.array[:slices]), image.ijk_to_lps)
        label = Volume(np.ascontiguousarray(label.array[:slices]), label.ijk_to_lps)
    frames = make_slice_stack(image)
    label_stack = frames.labels(label)
    present = [n for n in range(frames.num_slices) if all((label_stack[n] == v).any() for v in LABELS)]
    anchor = present[len(present) // 2]
    return image, label, table, frames, label_stack, anchor


def naive(case: str, slices: int, size: int) -> dict:
    import torch
    from PIL import Image
    from sam2.build_sam import build_sam2_video_predictor
    from proxyprompt.models.sam2_model import hydra_overrides

    image, _, _, frames, label_stack, anchor = load(case, slices)
    extra = [o for o in hydra_overrides(size) if "image_size" in o or "feat_sizes" in o]
    torch.manual_seed(0)
    predictor = build_sam2_video_predictor(CONFIG, None, device="cpu", hydra_overrides_extra=extra)
    raw = np.moveaxis(np.asarray(image.array, dtype=np.float32), frames.axis, 0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for n, plane in enumerate(raw):  # per-slice min-max to 8 bit, as the existing extensions do
            low, high = float(plane.min()), float(plane.max())
            scaled = np.zeros_like(plane) if high <= low else (plane - low) / (high - low)
            Image.fromarray((scaled * 255).astype(np.uint8)).convert("RGB").save(Path(folder) / f"{n:05d}.jpg")
        with torch.inference_mode():
            state = predictor.init_state(video_path=folder)
            for value in LABELS:
                predictor.add_new_mask(state, anchor, value, label_stack[anchor] == value)
            outputs = {}
            for reverse in (False, True):
                for frame, _, logits in predictor.propagate_in_video(state, start_frame_idx=anchor, reverse=reverse):
                    outputs[frame] = (logits > 0).cpu().numpy()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "slices": frames.num_slices, "frames_out": len(outputs)}


def ours(case: str, slices: int, size: int, rerun: bool, precision: str = "auto") -> dict:
    from proxyprompt.generators.base import Generator, ObjectPrompt, PromptPlan, ReferenceCase, register_generator
    from proxyprompt.pipeline import Engine

    image, label, table, frames, label_stack, anchor = load(case, slices)

    @register_generator
    class MaskOnFrame(Generator):  # benchmark-only plug-in: the naive workflow's prompts, our engine
        name = "bench-mask-on-frame"

        def plan(self, context):
            objects = {v: ObjectPrompt(label=v, masks={anchor: label_stack[anchor] == v}) for v in LABELS}
            return PromptPlan(objects=objects, start_frame=anchor)

    engine = Engine(model="random", image_size=size, device="cpu", precision=precision)
    reference = ReferenceCase(image, label, table)
    started = time.perf_counter()
    first = engine.segment([reference], image, generator="bench-mask-on-frame")
    result = {"seconds": time.perf_counter() - started, "slices": frames.num_slices,
              "encoder_calls": engine.model.encoder_calls, "timings": first.timings,
              "precision": engine.model.precision}
    if rerun:
        corrected = min(anchor + 2, frames.num_slices - 1)
        corrections = label.with_array(np.where(np.isin(label.array, LABELS), label.array, 0).astype(np.uint16))
        calls = engine.model.encoder_calls
        started = time.perf_counter()
        second = engine.segment([reference], image, generator="bench-mask-on-frame", corrections=corrections,
                                corrected_slices=[corrected])
        result = {"seconds": time.perf_counter() - started, "slices": frames.num_slices,
                  "encoder_calls_added": engine.model.encoder_calls - calls, "timings": second.timings,
                  "corrected": corrected, "anchor": anchor, "frames_propagated": engine.model.frames_propagated,
                  "incremental": bool(engine.model._last_run.get("incremental")),
                  "precision": engine.model.precision}
    return result


def worker(kind: str, case: str, slices: int, size: int) -> None:
    import torch

    torch.set_num_threads(2)
    if kind == "a":
        result = naive(case, slices, size)
    elif kind == "b32":  # ours, first run, at the precision auto did not choose: what the choice gains
        other = "fp32" if select_precision("auto", "cpu") == "bf16" else "bf16"
        result = ours(case, slices, size, rerun=False, precision=other)
    else:
        result = ours(case, slices, size, rerun=(kind == "c"))
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def run_config(kind: str, case: str, slices: int, size: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--case", case,
               "--slices", str(slices), "--sizes", str(size)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"configuration {kind} at {size} px failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def previous_rows(skip_sizes) -> list:
    """Table rows of the current section for sizes not in `skip_sizes` (kept when only some sizes re-run)."""
    if not DOC.exists() or START not in DOC.read_text():
        return []
    section = DOC.read_text().split(START, 1)[1].split(END, 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells and cells[0].isdigit() and int(cells[0]) not in skip_sizes:
            rows.append(line)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--case", default="patient001_ED")
    parser.add_argument("--worker", choices=["a", "b", "b32", "c"])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--rss-slices", type=int, default=0,
                        help="also run (b)+(c) at 1024 px on this many slices (ED+ES stacked) for peak RSS")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.case, args.slices, args.sizes[0])
        return
    rows, raw = [], {}
    for size in args.sizes:
        results = {kind: run_config(kind, args.case, args.slices, size) for kind in ("a", "b", "b32", "c")}
        raw[size] = results
        a, b, c = (results[k]["seconds"] for k in ("a", "b", "c"))
        n = results["a"]["slices"]
        c_info = results["c"]
        names = {"a": "(a) naive: JPEG folder + stock predictor (float32, as sam2 runs on a CPU)",
                 "b": f"(b) ours, first run, {results['b']['precision']} (encode "
                      f"{results['b']['timings']['encode']:.1f} s + propagate {results['b']['timings']['propagate']:.1f} s)",
                 "b32": f"(b') ours, first run forced to {results['b32']['precision']} (encode "
                        f"{results['b32']['timings']['encode']:.1f} s + "
                        f"propagate {results['b32']['timings']['propagate']:.1f} s)",
                 "c": f"(c) ours, re-run after 1 corrected slice ({c_info['encoder_calls_added']} encoder calls, "
                      f"{'incremental' if c_info['incremental'] else 'full'}: slice {c_info['corrected']} corrected, "
                      f"{c_info['frames_propagated']} of {n} frames re-tracked)"}
        for kind in ("a", "b", "b32", "c"):
            r = results[kind]
            rows.append(f"| {size} | {names[kind]} | {r['seconds'] / n:.2f} | {r['seconds']:.1f} | "
                        f"{r['peak_rss_mb']:.0f} |")
        b32 = results["b32"]["seconds"]
        rows.append(f"| {size} | ratios | a/b = {a / b:.2f}x (a/b' = {a / b32:.2f}x) | b/c = {b / c:.2f}x | |")
        print(json.dumps({size: results}, indent=1), flush=True)
    rss_line = []
    if args.rss_slices:
        r = run_config("c", args.case, args.rss_slices, 1024)
        raw["rss"] = r
        rss_line = ["", f"Peak RSS check: {r['slices']} slices (ED + ES of {args.case[:-3]} stacked), 1024 px, ours "
                        f"first run + re-run after 1 corrected slice in one process: peak RSS {r['peak_rss_mb']:.0f} MB "
                        f"(target < 4096 MB: {'met' if r['peak_rss_mb'] < 4096 else 'NOT met'})."]
        print(json.dumps(r), flush=True)
    command = "cd /work/main && .venv/bin/python benchmarks/speed.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in
        (("slices", args.slices), ("sizes", args.sizes), ("case", args.case))
        + ((("rss-slices", args.rss_slices),) if args.rss_slices else ()))
    kept = previous_rows(set(args.sizes))
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs: timings are indicative), " \
              f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    text = "\n".join([
        "## Speed: naive SAM 2 workflow vs ProxyPrompt (issue 3 item 8)",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {machine}. Device: CPU, torch threads 2.",
        f"Volume: ACDC {args.case}, {results['a']['slices']} slices, 3 structures (RV, myocardium, LV); "
        "prompts: each structure's ground-truth mask on the middle slice (the same for (a), (b), (c)).",
        "Model: sam2.1 hiera tiny architecture with RANDOM weights (same compute as the real model; "
        "these are timings, not accuracy). Model build time excluded; (a) includes writing the JPEGs.",
        "(a) runs float32 (the stock predictor adds no autocast on a CPU); (b) and (c) run at the engine's "
        f"default precision (`auto`: {results['b']['precision']} on this CPU, which has "
        f"{'' if cpu_has_amx() else 'no '}Intel AMX); (b') is (b) at the other precision.",
        "(c) is incremental: the model keeps the first run's sam2 state (same target, same plan) and re-tracks "
        "only the frames downstream of the corrected slice (away from the start slice, up to the next "
        "conditioning slice or the volume end); the other slices keep the first run's output. Its time also "
        "includes the generator and write-back.",
        "",
        f"Command: `{command}`",
        "",
        "| px | configuration | s / slice | whole volume s | peak RSS MB |",
        "|---|---|---|---|---|",
        *rows,
        *rss_line,
        *([""] + ["Rows below: kept from the previous version of this section (not re-run this time):", "",
                  "| px | configuration | s / slice | whole volume s | peak RSS MB |", "|---|---|---|---|---|"]
          + kept if kept else []),
    ])
    if not args.no_write:
        write_section(DOC, "speed", text)
    print(text)


if __name__ == "__main__":
    main()
