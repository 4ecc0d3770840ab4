"""Per-structure quality estimate of a result, computed without any ground truth, and its plain warning.

A registered result is trustworthy where independent evidence agrees: the registration candidates (different
pipelines / starts) put the structure in the same place, the references (several given) agree after
fusion, the target's own contrast confirms the border (the intensity stage barely moves it), and the images
match after alignment. Each of these is a number in [0, 1]; the score is their mean, times the image match
(a wrong reference with a high agreement still aligns poorly). ``LOW_QUALITY`` is where a warning is shown.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from .metrics import dice

# below this score a structure gets a warning. Set after the held-out runs of docs/benchmarks.md (so not held
# out itself): at 0.5 it flagged 29 of 30 ACDC structures; at 0.3, 16 of 30 (their mean Dice 0.47, the others'
# 0.88) and none of the 40 hippocampus structures (mean Dice 0.73)
LOW_QUALITY = 0.3
LOW_QUALITY_PREFIX = "LOW CONFIDENCE"  # every warning starts with it (front ends show these as warnings)


def label_agreement(label: np.ndarray, others: Iterable[np.ndarray], values: Iterable[int]) -> Dict[int, float]:
    """Per label value: the mean Dice of `label` with each of `others` (1.0 when there are none)."""
    others = list(others)
    result = {}
    for value in values:
        scores = [dice(label == value, other == value) for other in others]
        result[int(value)] = float(np.mean(scores)) if scores else 1.0
    return result


def structure_quality(values: Sequence[int], similarity: float, evidence: Mapping[str, Mapping[int, float]]
                      ) -> Dict[int, dict]:
    """label value -> {"score", "similarity", <each evidence name>}, all rounded to 3 decimals.

    `evidence`: name -> (label value -> agreement in [0, 1]); `similarity`: the image match (NCC) after
    alignment. score = mean agreement x max(similarity, 0).
    """
    quality = {}
    match = max(float(similarity), 0.0)
    for value in values:
        parts = {name: float(per_label[value]) for name, per_label in evidence.items() if value in per_label}
        agreement = float(np.mean(list(parts.values()))) if parts else 1.0
        entry = {"score": round(agreement * match, 3), "similarity": round(float(similarity), 3)}
        entry.update({name: round(v, 3) for name, v in parts.items()})
        quality[int(value)] = entry
    return quality


def quality_warnings(quality: Mapping[int, dict], names: Optional[Mapping[int, str]] = None,
                     threshold: float = LOW_QUALITY) -> List[str]:
    """Plain-language warnings for the structures whose score is under `threshold`."""
    messages = []
    for value, entry in sorted(quality.items()):
        if entry["score"] < threshold:
            name = (names or {}).get(value, f"label {value}")
            messages.append(
                f"{LOW_QUALITY_PREFIX} for {name}: quality {entry['score']:.2f} < {threshold:.2f} (the registration "
                "candidates / references disagree or the images match poorly); check this structure, or give "
                "a reference closer to this target"
            )
    return messages
