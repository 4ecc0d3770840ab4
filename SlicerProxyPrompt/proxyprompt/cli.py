"""`proxyprompt` command line: segment, train, evaluate, models, download, clear-cache, serve, demo.

Exit codes (docs/reliability.md): 0 success; 2 bad input (one-line reason on stderr, no output file, inputs
untouched); 1 the environment failed (disk full, I/O error; one line) or an internal error (one line naming the
file that holds the full trace); 130 cancelled (Ctrl+C). With --json one JSON object goes to stdout and logs go
to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import traceback
from typing import List, Optional

from . import __version__
from .errors import Cancelled, CheckpointError, DownloadError, InputError, OutputWriteError

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
    add_option_flags(seg)
    seg.add_argument("--labels", type=_int_list, help="label values to segment, e.g. 1,3 (default: all)")
    seg.add_argument("--slice-axis", type=int, choices=[0, 1, 2],
                     help="array axis to slice along (0 = k); default: the axis with the largest spacing")
    seg.add_argument("--corrections", help="labelmap on the target grid with corrected slices")
    seg.add_argument("--corrected-slices", type=_int_list,
                     help="which slices of --corrections were corrected (default: every non-empty slice)")
    seg.add_argument("--annotated-slices", type=_int_list,
                     help="sparse reference: the slices (along its acquisition axis) that were annotated; the others "
                          "are unknown, not background (default: the slices that hold any label)")
    seg.add_argument("--no-cleanup", action="store_true", help="keep every connected component")
    seg.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")

    tr = commands.add_parser("train", help="train a generator's own weights (e.g. proxy-prompt) on annotated cases")
    tr.add_argument("--generator", required=True, help="a trainable generator (e.g. proxy-prompt)")
    tr.add_argument("--image", action="append", required=True, metavar="I", help="training image (repeat)")
    tr.add_argument("--label", action="append", required=True, metavar="L", help="its label map, one per --image")
    tr.add_argument("--label-table", help="JSON or Slicer colour table with label names and colours")
    tr.add_argument("--model", default="auto", help="the model whose features the generator learns to prompt")
    tr.add_argument("--checkpoint", help="model checkpoint file (overrides the registry)")
    tr.add_argument("--output", metavar="CKPT",
                    help="checkpoint to write (default: the generator's registered checkpoint for the model)")
    tr.add_argument("--log", metavar="FILE", help='JSON-lines loss log, one {"step": ..., "loss": ...} per line')
    tr.add_argument("--resume", metavar="CKPT", help="continue training from this checkpoint")
    add_training_flags(tr)
    tr.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = commands.add_parser("evaluate", help="Dice, HD95 and volume difference against ground truth")
    ev.add_argument("--prediction", required=True)
    ev.add_argument("--truth", required=True)
    ev.add_argument("--label-table")
    ev.add_argument("--json", action="store_true")

    models = commands.add_parser("models", help="known models, whether cached, size")
    models.add_argument("--json", action="store_true")

    dl = commands.add_parser("download", help="fetch a model into the cache, verified")
    dl.add_argument("name")

    clear = commands.add_parser("clear-cache", help="remove the cached model weights and reference features "
                                                    "($PROXYPROMPT_HOME, default ~/.proxyprompt)")
    clear.add_argument("--features-only", action="store_true", help="keep the weights, remove the reference features")
    clear.add_argument("--json", action="store_true")

    commands.add_parser("serve", help="engine worker: JSON-lines requests on stdin, events on stdout (Slicer module)")

    demo = commands.add_parser("demo", help="the main job on sample data (ACDC)")
    demo.add_argument("--data", help="data folder holding acdc/ (default: ../shared/data beside the repository)")
    demo.add_argument("--output-dir", default="out/demo")
    demo.add_argument("--reference", default="patient001_ED")
    demo.add_argument("--target", default="patient002_ED")
    demo.add_argument("--model", default="auto")
    demo.add_argument("--generator")
    demo.add_argument("--json", action="store_true")
    return parser


FLAG_ALIASES = {"fusion_top_k": ("--top-k",)}  # earlier names of generated flags, still accepted


def generator_option_classes():
    from .generators import list_generators

    return [generator.Options for generator in list_generators()]


def add_option_flags(parser) -> None:
    """The engine's and every generator's option flags, built from their options dataclasses (`options.py`)."""
    from .options import EngineOptions, cli_arguments, merged_cli_arguments

    for flag, kwargs in cli_arguments(EngineOptions):
        parser.add_argument(flag, *FLAG_ALIASES.get(kwargs["dest"], ()), **kwargs)
    for flag, kwargs in merged_cli_arguments(generator_option_classes()).items():
        kwargs = dict(kwargs, help=kwargs["help"] + " (generator option)")
        parser.add_argument(flag, *FLAG_ALIASES.get(kwargs["dest"], ()), **kwargs)


def add_training_flags(parser) -> None:
    """`train`'s option flags: the training options, the model's engine options and every generator's options."""
    from .options import EngineOptions, TrainingOptions, cli_arguments, merged_cli_arguments

    for flag, kwargs in cli_arguments(TrainingOptions):
        parser.add_argument(flag, **kwargs)
    for flag, kwargs in cli_arguments(EngineOptions):
        if kwargs["dest"] in EngineOptions.MODEL_FIELDS:
            parser.add_argument(flag, **kwargs)
    for flag, kwargs in merged_cli_arguments(generator_option_classes()).items():
        parser.add_argument(flag, **dict(kwargs, help=kwargs["help"] + " (generator option)"))


# --- commands -----------------------------------------------------------------------------------
def request_from_args(args) -> "SegmentRequest":
    from .options import EngineOptions
    from .service import SegmentRequest

    generator_fields = {name for cls in generator_option_classes() for name in cls.names()}
    return SegmentRequest(
        reference_images=list(args.reference_image), reference_labels=list(args.reference_label),
        target=args.target, output=args.output, label_table=args.label_table, generator=args.generator,
        model=args.model, checkpoint=args.checkpoint, labels=args.labels, slice_axis=args.slice_axis,
        corrections=args.corrections, corrected_slices=args.corrected_slices, cleanup=not args.no_cleanup,
        annotated_slices=args.annotated_slices,
        generator_options={name: getattr(args, name) for name in sorted(generator_fields) if hasattr(args, name)},
        **{name: getattr(args, name) for name in EngineOptions.names()},
    )


def run_segment(args) -> dict:
    from .progress import TqdmProgress
    from .service import EngineSession

    progress = TqdmProgress(enabled=not args.quiet)
    try:
        return EngineSession().segment(request_from_args(args), progress=progress)
    finally:
        progress.close()


def run_train(args) -> dict:
    from .options import EngineOptions, TrainingOptions
    from .progress import TqdmProgress
    from .training import TrainRequest, train

    generator_fields = {name for cls in generator_option_classes() for name in cls.names()}
    request = TrainRequest(
        generator=args.generator, images=list(args.image), labels=list(args.label), model=args.model,
        output=args.output, checkpoint=args.checkpoint, label_table=args.label_table, log=args.log,
        resume=args.resume,
        generator_options={name: getattr(args, name) for name in sorted(generator_fields) if hasattr(args, name)},
        **{name: getattr(args, name) for name in (*TrainingOptions.names(), *EngineOptions.MODEL_FIELDS)},
    )
    progress = TqdmProgress(enabled=not args.quiet)
    try:
        return train(request, progress=progress)
    finally:
        progress.close()


def run_evaluate(args) -> dict:
    from .metrics import evaluate
    from .volume import read_label

    prediction, _ = read_label(args.prediction)
    truth, table = read_label(args.truth, args.label_table)
    if not truth.array.any():
        raise InputError(f"truth {args.truth} holds no labels: nothing to evaluate")
    return evaluate(prediction, truth, label_table=table)


def run_models(args) -> list:
    from .models.registry import list_models

    return list_models()


def run_download(args) -> dict:
    from .models.download import download_model

    path = download_model(args.name, progress=True)
    return {"name": args.name, "path": str(path) if path else None}


def run_clear_cache(args) -> dict:
    """The one clear command of every cache: downloaded weights (with their sidecars and the verification
    record) and the reference features (models/feature_cache.py)."""
    from .models.feature_cache import clear_feature_cache, feature_cache_dir
    from .models.registry import cache_dir

    freed = {"features": clear_feature_cache(), "weights": 0}
    if not args.features_only and cache_dir().is_dir():
        for path in cache_dir().iterdir():
            if path.is_file():
                freed["weights"] += path.stat().st_size
                path.unlink()
    return {"features_dir": str(feature_cache_dir()), "weights_dir": str(cache_dir()), "bytes_freed": freed}


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
        elif args.command == "train":
            summary = run_train(args)
            if args.json:
                print(json.dumps(summary))
            else:
                log.info("wrote %s (%s for %s, %d masks, %s steps, final loss %s, %.1f s)", summary["output"],
                         summary["generator"], summary["model"], summary["num_masks"], summary["steps"],
                         summary["final_loss"], summary["seconds"])
        elif args.command == "evaluate":
            report = run_evaluate(args)
            from .metrics import format_evaluation

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
        elif args.command == "clear-cache":
            result = run_clear_cache(args)
            if args.json:
                print(json.dumps(result))
            else:
                freed = result["bytes_freed"]
                print(f"removed {freed['features'] / 1e6:.1f} MB of reference features ({result['features_dir']}) and "
                      f"{freed['weights'] / 1e6:.1f} MB of weights ({result['weights_dir']})")
        elif args.command == "serve":
            from .serve import serve

            return serve()
        elif args.command == "demo":
            from .demo import run_demo

            summary = run_demo(args)
            if args.json:
                print(json.dumps(summary))
        sys.stdout.flush()  # a closed pipe surfaces here, not at interpreter exit
        return EXIT_OK
    except (InputError, CheckpointError) as error:
        _error_line(f"error: {error}")
        return EXIT_BAD_INPUT
    except DownloadError as error:
        _error_line(f"download failed: {error}")
        return EXIT_BAD_INPUT
    except (Cancelled, KeyboardInterrupt):
        _error_line("cancelled; nothing was written")
        return EXIT_CANCELLED
    except MemoryError:
        _error_line("error: out of memory; crop the target or use --image-size 512")
        return EXIT_FAILURE
    except BrokenPipeError:
        _silence_stdout()  # the reader closed the pipe (`proxyprompt models | head -1`): nothing left to say
        return EXIT_FAILURE
    except OutputWriteError as error:
        _error_line(f"error: {error}")
        return EXIT_FAILURE
    except OSError as error:  # the environment: permissions, full disk, I/O errors outside the output write
        where = f" ({error.filename})" if error.filename else ""
        _error_line(f"error: {error.strerror or error}{where}")
        return EXIT_FAILURE
    except Exception as error:  # a bug: one line for the user, the trace in a file for the report
        _error_line(f"internal error ({type(error).__name__}: {_first_line(error)}); full trace in "
                    f"{_write_trace()}")
        return EXIT_FAILURE


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else "no message"


def _error_line(text: str) -> None:
    """One line on stderr, whatever the locale's encoding."""
    line = "proxyprompt: " + " ".join(text.split("\n"))
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (UnicodeEncodeError, ValueError, OSError):
        try:
            sys.stderr.write(line.encode("ascii", "backslashreplace").decode("ascii") + "\n")
        except (ValueError, OSError):
            pass


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # in-process callers (tests) have no real stdout


def _write_trace() -> str:
    """Write the current exception's trace to a log file; its path (or 'stderr' when no file could be made)."""
    text = traceback.format_exc()
    try:
        descriptor, path = tempfile.mkstemp(prefix="proxyprompt-error-", suffix=".log")
        with os.fdopen(descriptor, "w", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(f"proxyprompt {__version__}, argv {sys.argv!r}\n{text}")
        return path
    except OSError:
        sys.stderr.write(text)
        return "stderr (above)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
