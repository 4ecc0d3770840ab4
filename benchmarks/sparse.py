"""Sparse references (issue 16, item 3): a reference with only 3 annotated slices, per anatomy.

For target i (cases sorted) the reference is case i+offset with only 3 of its labelled slices kept (at 1/6, 1/2 and
5/6 of its labelled range, along its acquisition axis); the others are unknown. Rows:

* copy of the best-matching annotated slice: the reference resampled onto the target grid after aligning the
  image centres; each target slice gets the mask of the annotated reference slice whose image matches it best
  (NCC), empty where no annotated slice matches (NCC <= 0);
* registration generator (`--model none`) with the sparse reference (`proxyprompt.sparse`: interpolated between the
  annotated slices, unknown beyond them);
* the same reference fully annotated (for scale).

    .venv/bin/python benchmarks/sparse.py --data ../shared/data/hippocampus --targets 10 --offset 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import write_section  # noqa: E402

from proxyprompt.frames import choose_slice_axis  # noqa: E402
from proxyprompt.generators.base import ReferenceCase  # noqa: E402
from proxyprompt.metrics import dice  # noqa: E402
from proxyprompt.pipeline import Engine  # noqa: E402
from proxyprompt.sparse import annotated_slices  # noqa: E402
from proxyprompt.volume import read_image, read_label  # noqa: E402

from oneshot import case_names, header, summarise  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
COPY = "copy of the best-matching annotated slice"
SPARSE = "registration generator, sparse reference (3 slices)"
FULL = "registration generator, full reference"


def keep_slices(label, count=3):
    axis, found = annotated_slices(label)
    picks = sorted({found[int(round(f * (len(found) - 1)))] for f in (1 / 6, 1 / 2, 5 / 6)})
    array = np.moveaxis(np.asarray(label.array), axis, 0).copy()
    keep = np.isin(np.arange(array.shape[0]), picks)
    array[~keep] = 0
    return label.with_array(np.ascontiguousarray(np.moveaxis(array, 0, axis))), axis, picks


def copy_best_slice(reference_image, sparse_label, axis, picks, target_image):
    """The baseline: centred resampling onto the target grid, then per target slice the best NCC annotated slice."""
    target = target_image.to_sitk()
    reference = reference_image.to_sitk()
    shift = (np.asarray(reference.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in reference.GetSize()]))
             - np.asarray(target.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in target.GetSize()])))
    transform = sitk.TranslationTransform(3, tuple(shift))
    image = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(reference, sitk.sitkFloat32), target, transform,
                                                 sitk.sitkLinear, 0.0))
    # annotated reference slices as masks on the target grid: resample each kept slice's label alone
    label_sitk = sitk.Cast(sparse_label.to_sitk(), sitk.sitkUInt16)
    label = sitk.GetArrayFromImage(sitk.Resample(label_sitk, target, transform, sitk.sitkNearestNeighbor, 0))
    target_axis = choose_slice_axis(target_image)
    target_slices = np.moveaxis(np.asarray(target_image.array, dtype=np.float64), target_axis, 0)
    image_slices = np.moveaxis(image, target_axis, 0)
    label_slices = np.moveaxis(label, target_axis, 0)
    candidates = [n for n in range(label_slices.shape[0]) if label_slices[n].any()]
    output = np.zeros_like(label_slices)

    def ncc(a, b):
        a = a - a.mean()
        b = b - b.mean()
        d = np.sqrt((a * a).sum() * (b * b).sum())
        return float((a * b).sum() / d) if d > 0 else 0.0

    for n in range(target_slices.shape[0]):
        scores = [ncc(target_slices[n], image_slices[c]) for c in candidates]
        if scores and max(scores) > 0:
            output[n] = label_slices[candidates[int(np.argmax(scores))]]
    return np.ascontiguousarray(np.moveaxis(output, 0, target_axis))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--glob", default="*_image.nii.gz")
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--offset", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    names = case_names(args.data, args.glob)
    engine = Engine("none")
    rows = {COPY: [], SPARSE: [], FULL: []}  # method -> [{"dice": per label, "seconds": s}]
    values = None
    for t in range(args.first, args.first + args.targets):
        target_name, reference_name = names[t % len(names)], names[(t + args.offset) % len(names)]
        target_image = read_image(args.data / f"{target_name}_image.nii.gz")
        truth = np.asarray(read_label(args.data / f"{target_name}_label.nii.gz")[0].array)
        reference_image = read_image(args.data / f"{reference_name}_image.nii.gz")
        reference_label, table = read_label(args.data / f"{reference_name}_label.nii.gz")
        values = values or sorted(int(v) for v in np.unique(truth) if v)
        sparse_label, axis, picks = keep_slices(reference_label)
        score = lambda label: [float(dice(label == v, truth == v)) for v in values]  # noqa: E731
        tick = time.perf_counter()
        copied = copy_best_slice(reference_image, sparse_label, axis, picks, target_image)
        rows[COPY].append({"dice": score(copied), "seconds": time.perf_counter() - tick})
        for name, label in ((SPARSE, sparse_label), (FULL, reference_label)):
            tick = time.perf_counter()
            result = engine.segment([ReferenceCase(reference_image, label, table)], target_image,
                                    generator="registration")
            rows[name].append({"dice": score(np.asarray(result.label.array)), "seconds": time.perf_counter() - tick})
        print(target_name, reference_name, picks,
              {n: round(float(np.mean(r[-1]["dice"])), 3) for n, r in rows.items()}, flush=True)
    labels = json.loads((args.data / "labels.json").read_text()) if (args.data / "labels.json").is_file() else {}
    table_text = summarise(rows, values, {v: labels.get(str(v), str(v)) for v in values})
    text = (header(f"Sparse references (3 annotated slices): {args.data.name}", "sparse.py", argv, started, load)
            + f"Pairs: targets {args.first}..{args.first + args.targets - 1} of {len(names)} (sorted), reference at offset "
            f"{args.offset}; the reference keeps 3 labelled slices (1/6, 1/2, 5/6 of its labelled range along its "
            f"acquisition axis). Dice mean / median.\n\n" + table_text + "\n")
    print(text)
    if not args.no_write:
        write_section(DOC, f"sparse-{args.data.name}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
