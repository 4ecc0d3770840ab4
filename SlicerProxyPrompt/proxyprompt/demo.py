"""`proxyprompt demo`: reference patient001_ED -> target patient002_ED on the shared ACDC data.

Uses the best path available here (SAM 2 when its weights are cached, else LiteMedSAM, else registration),
says which and why, and writes the segmentation (.seg.nrrd and .nii.gz), a PNG of outlines on a few target
slices, and the Dice table against the target's ground truth.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from .errors import InputError

log = logging.getLogger("proxyprompt")


def find_data_dir(data=None) -> Path:
    """The ACDC folder: --data (when given, only there), else $PROXYPROMPT_DATA, else ../shared/data beside the
    repository."""
    if data:
        candidates = [data]
    else:
        candidates = [os.environ.get("PROXYPROMPT_DATA"), Path(__file__).resolve().parents[3] / "shared" / "data",
                      Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if not candidate:
            continue
        folder = Path(candidate)
        for acdc in (folder / "acdc", folder):
            if (acdc / "labels.json").is_file():
                return acdc
    if data:
        raise InputError(f"no ACDC data in --data {data} (a folder holding acdc/labels.json, or the acdc folder)")
    raise InputError("no ACDC data found: pass --data DIR (a folder holding acdc/ or the acdc folder itself)")


def run_demo(args) -> dict:
    from .cases import load_reference_case
    from .metrics import evaluate, format_evaluation
    from .progress import TqdmProgress
    from .service import RANDOM_WEIGHTS_NOTE, resolve_model_choice
    from .pipeline import Engine
    from .render import render_outlines
    from .atomic import atomic_write
    from .volume import read_image, read_label, write_label

    acdc = find_data_dir(args.data)
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output folder {out}: {error.strerror or error}") from None
    reference = load_reference_case(acdc / f"{args.reference}_image.nii.gz", acdc / f"{args.reference}_label.nii.gz")
    target = read_image(acdc / f"{args.target}_image.nii.gz")
    truth, _ = read_label(acdc / f"{args.target}_label.nii.gz")

    model, generator = resolve_model_choice(args.model, args.generator)
    try:
        engine = Engine(model)
    except Exception as error:  # a model that will not load must not stop the demo: fall back, say why
        log.warning("model %s could not be loaded (%s); falling back to registration", model, error)
        model, generator = "none", "registration"
        engine = Engine("none")
    log.info("demo: %s -> %s with generator %s, model %s", args.reference, args.target, generator, model)
    progress = TqdmProgress()
    try:
        result = engine.segment([reference], target, generator=generator, progress=progress)
    finally:
        progress.close()

    stem = f"{args.target}_from_{args.reference}"
    note = RANDOM_WEIGHTS_NOTE if result.info["random_weights"] else ""
    seg_path = write_label(result.label, result.table, out / f"{stem}.seg.nrrd", note=note)
    nii_path = write_label(result.label, result.table, out / f"{stem}.nii.gz", note=note)
    report = evaluate(result.label, truth, label_table=result.table)
    title = f"{args.target} from {args.reference}: {generator} + {model}, mean Dice {report['mean_dice']:.3f}"
    png_path = render_outlines(target, result.label, result.table, out / f"{stem}.png", truth=truth, title=title)
    summary = {
        "reference": args.reference, "target": args.target, "generator": generator, "model": model,
        "random_weights": result.info["random_weights"], "outputs": [str(seg_path), str(nii_path), str(png_path)],
        "dice": {v: row["dice"] for v, row in report["labels"].items()}, "mean_dice": report["mean_dice"],
        "seconds": round(result.timings["total"], 2),
    }
    atomic_write(out / f"{stem}.dice.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    sys.stderr.write(f"\n{title}\n{format_evaluation(report)}\nwrote {seg_path}, {nii_path}, {png_path}\n")
    return summary
