"""`proxyprompt` command line: segment, evaluate, models, download, demo.

Exit codes: 0 success; 2 bad input (one-line reason on stderr, no output file); 1 unexpected failure;
130 cancelled (Ctrl+C). With --json one JSON object goes to stdout and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import List, Optional

from . import __version__
from .errors import Cancelled, DownloadError, InputError

log = logging.getLogger("proxyprompt")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad usage already; keep its message to one line."""

    def error(self, message):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        sys.stderr.write(f"proxyprompt: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _int_list(text: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="proxyprompt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"proxyprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    seg = commands.add_parser("segment", help="segment a target volume from annotated reference case(s)")
    seg.add_argument("--reference-image", action="append", required=True, metavar="R",
                     help="reference image (repeat for several references)")
    seg.add_argument("--reference-label", action="append", required=True, metavar="RL",
                     help="reference label map or .seg.nrrd, one per --reference-image")
    seg.add_argument("--label-table", help="JSON or Slicer colour table with label names and colours")
    seg.add_argument("--target", required=True, metavar="T", help="target image")
    seg.add_argument("--output", required=True, metavar="OUT", help="output .nii.gz, .nrrd or .seg.nrrd")
    seg.add_argument("--generator", help="prompt generator (default: the best one for the model)")
    seg.add_argument("--model", default="auto",
                     help="model name, 'none' (registration only), 'random' (tests) or 'auto' (best available)")
    seg.add_argument("--checkpoint", help="model checkpoint file (overrides the registry)")
    seg.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    seg.add_argument("--image-size", type=int, help="model input size (SAM 2: 1024 or 512)")
    seg.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                     help="model arithmetic; auto = bf16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16)")
    seg.add_argument("--labels", type=_int_list, help="label values to segment, e.g. 1,3 (default: all)")
    seg.add_argument("--slice-axis", type=int, choices=[0, 1, 2],
                     help="array axis to slice along (0 = k); default: the axis with the largest spacing")
    seg.add_argument("--corrections", help="labelmap on the target grid with corrected slices")
    seg.add_argument("--corrected-slices", type=_int_list,
                     help="which slices of --corrections were corrected (default: every non-empty slice)")
    seg.add_argument("--registration-method",
                     choices=["copy", "centred", "located", "affine", "deformable", "intensity"],
                     help="registration stages (default: intensity = locate, affine, demons, intensity EM with "
                          "--model none; deformable = without the EM as a model's prior)")
    seg.add_argument("--fusion", default="vote", choices=["vote", "staple", "mean"],
                     help="label fusion of several references (mean: of the soft warped maps)")
    seg.add_argument("--top-k", type=int,
                     help="fuse the k references whose warped labels agree best (default: 3 when more than 3 are given)")
    seg.add_argument("--no-cleanup", action="store_true", help="keep every connected component")
    seg.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = commands.add_parser("evaluate", help="Dice, HD95 and volume difference against ground truth")
    ev.add_argument("--prediction", required=True)
    ev.add_argument("--truth", required=True)
    ev.add_argument("--label-table")
    ev.add_argument("--json", action="store_true")

    models = commands.add_parser("models", help="known models, whether cached, size")
    models.add_argument("--json", action="store_true")

    dl = commands.add_parser("download", help="fetch a model into the cache, verified")
    dl.add_argument("name")

    demo = commands.add_parser("demo", help="the main job on sample data (ACDC)")
    demo.add_argument("--data", help="data folder holding acdc/ (default: ../shared/data beside the repository)")
    demo.add_argument("--output-dir", default="out/demo")
    demo.add_argument("--reference", default="patient001_ED")
    demo.add_argument("--target", default="patient002_ED")
    demo.add_argument("--model", default="auto")
    demo.add_argument("--generator")
    demo.add_argument("--json", action="store_true")
    return parser


# --- progress -----------------------------------------------------------------------------------
class TqdmProgress:
    """Progress callback (phase, done, total) -> one tqdm bar per phase on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bars = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self._bars.get(phase)
        if bar is None:
            unit = {"register": "%", "align": "step"}.get(phase, "slice")
            bar = self._bars[phase] = tqdm(total=total, desc=phase, unit=unit, file=sys.stderr, leave=False)
        bar.total = total
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


# --- model choice -------------------------------------------------------------------------------
def resolve_model_choice(model: str, generator: Optional[str]):
    """'auto' -> the best model available here, and the generator measured best with it."""
    from .models.base import best_available_model

    if model == "auto":
        model, reason = best_available_model()
        log.info("model: %s (%s)", model, reason)
    if generator is None:
        generator = default_generator_for(model)
    return model, generator


def default_generator_for(model: str) -> str:
    from .models.registry import get_model_spec

    # With a model, support-memory (reference slices as memory / aligned prompts; the registration prior when no
    # slice aligns): ACDC, LiteMedSAM, 80 cross-patient pairs, on par with the registration prior as prompts (mean
    # Dice 0.539 vs 0.530; 0.484 vs 0.501 on the 40 pairs that chose no setting, docs/benchmarks.md), and the form
    # SAM 2's memory takes. Without a model, registration is the only generator that gives a segmentation.
    return "registration" if get_model_spec(model).family == "none" else "support-memory"


# --- commands -----------------------------------------------------------------------------------
def run_segment(args) -> dict:
    from .cases import load_reference_case
    from .pipeline import Engine, MAX_TARGET_VOXELS
    from .volume import check_output_path, read_image, read_label, write_label

    started = time.perf_counter()
    if len(args.reference_image) != len(args.reference_label):
        raise InputError(
            f"{len(args.reference_image)} --reference-image but {len(args.reference_label)} --reference-label: "
            "give one label per reference image"
        )
    output = check_output_path(args.output)
    references = [
        load_reference_case(image, label, args.label_table)
        for image, label in zip(args.reference_image, args.reference_label)
    ]
    target = read_image(args.target, max_voxels=MAX_TARGET_VOXELS)
    corrections = None
    if args.corrections:
        corrections, _ = read_label(args.corrections)
    model, generator = resolve_model_choice(args.model, args.generator)
    read_seconds = time.perf_counter() - started

    engine = Engine(model, checkpoint=args.checkpoint, device=args.device, image_size=args.image_size,
                    precision=args.precision)
    if engine.model is not None and engine.model.is_random:
        log.warning("model '%s' has RANDOM weights: the output tests the pipeline, it is not a segmentation", model)
    progress = TqdmProgress(enabled=not args.quiet)
    try:
        result = engine.segment(
            references, target, generator=generator, labels=args.labels, slice_axis=args.slice_axis,
            corrections=corrections, corrected_slices=args.corrected_slices, cleanup=not args.no_cleanup,
            options={"registration_method": args.registration_method, "fusion": args.fusion,
                     "top_k": args.top_k if args.top_k else (3 if len(references) > 3 else None)},
            progress=progress,
        )
    finally:
        progress.close()
    tick = time.perf_counter()
    write_label(result.label, result.table, output)
    seconds = dict(result.timings)
    seconds["read"] = read_seconds
    seconds["write"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    summary = {
        "output": str(output),
        "generator": result.info["generator"],
        "model": result.info["model"],
        "device": result.info["device"],
        "precision": result.info["precision"],
        "random_weights": result.info["random_weights"],
        "slices": result.info["slices"],
        "slice_axis": result.info["slice_axis"],
        "labels": {str(v): info.name for v, info in result.table.items()},
        "corrected_slices": result.info["corrected_slices"],
        "references": len(references),
        "notes": result.info["notes"],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    for note in result.info["notes"]:  # what the generator did (which slices it matched, how well): the user checks
        log.info("%s", note)
    return summary


def run_evaluate(args) -> dict:
    from .metrics import evaluate
    from .volume import read_label

    prediction, _ = read_label(args.prediction)
    truth, table = read_label(args.truth, args.label_table)
    return evaluate(prediction, truth, label_table=table)


def format_evaluation(report: dict) -> str:
    lines = [f"{'label':>5}  {'name':<22} {'dice':>6} {'hd95 mm':>8} {'dvol ml':>8}"]
    for value, row in report["labels"].items():
        hd = "-" if row["hd95_mm"] is None else f"{row['hd95_mm']:.1f}"
        dv = "-" if row["volume_difference_ml"] is None else f"{row['volume_difference_ml']:.1f}"
        lines.append(f"{value:>5}  {row['name'][:22]:<22} {row['dice']:6.3f} {hd:>8} {dv:>8}")
    lines.append(f"{'':>5}  {'mean':<22} {report['mean_dice']:6.3f}")
    return "\n".join(lines)


def run_models(args) -> list:
    from .models.registry import list_models

    return list_models()


def run_download(args) -> dict:
    from .models.download import download_model

    path = download_model(args.name, progress=True)
    return {"name": args.name, "path": str(path) if path else None}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s: %(message)s")
    try:
        if args.command == "segment":
            summary = run_segment(args)
            if args.json:
                print(json.dumps(summary))
            else:
                log.info("wrote %s (%s, model %s, %d slices, %.1f s)", summary["output"], summary["generator"],
                         summary["model"], summary["slices"], summary["seconds"]["total"])
        elif args.command == "evaluate":
            report = run_evaluate(args)
            print(json.dumps(report) if args.json else format_evaluation(report))
        elif args.command == "models":
            rows = run_models(args)
            if args.json:
                print(json.dumps(rows))
            else:
                for row in rows:
                    size = row.get("size_bytes")
                    size_text = f"{size / 1e6:8.1f} MB" if size else "       -   "
                    state = "cached" if row.get("cached") else "-"
                    print(f"{row['name']:<24} {row['family']:<11} {size_text}  {state:<7} {row.get('description', '')}")
        elif args.command == "download":
            result = run_download(args)
            print(result["path"] or f"{args.name}: nothing to download")
        elif args.command == "demo":
            from .demo import run_demo

            summary = run_demo(args)
            if args.json:
                print(json.dumps(summary))
        return EXIT_OK
    except InputError as error:
        sys.stderr.write(f"proxyprompt: error: {error}\n")
        return EXIT_BAD_INPUT
    except DownloadError as error:
        sys.stderr.write(f"proxyprompt: download failed: {error}\n")
        return EXIT_BAD_INPUT
    except (Cancelled, KeyboardInterrupt):
        sys.stderr.write("proxyprompt: cancelled; nothing was written\n")
        return EXIT_CANCELLED
    except MemoryError:
        sys.stderr.write("proxyprompt: error: out of memory; crop the target or use --image-size 512\n")
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
