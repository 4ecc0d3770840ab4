"""Replay the registration candidate choice on the per-pair JSON of `oneshot.py --calibration` (issue 16).

Each pair's JSON holds every candidate's label-free evidence and its true Dice with and without the intensity EM,
so the engine's own `choose_candidate` (and the intensity gate of `conclude`) can be replayed on many pairs
without registering again. Rows per set of pairs:

* previous default: locate-first + intensity EM;
* textbook: the geometry-centred candidate alone;
* the choice without the volume-change bound (every candidate treated as plausible);
* the default choice (`choose_candidate`), + gated intensity EM.

It also counts, per set, the pairs where the default is more than `--margin` below / above the previous default.

    .venv/bin/python benchmarks/choice_replay.py "ACDC ED offset 3=/tmp/off3.json" "hippocampus=/tmp/rep_h.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerProxyPrompt"))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import write_section  # noqa: E402

from proxyprompt.registration import SCORE_DECIMALS  # noqa: E402
from proxyprompt.registration_candidates import (  # noqa: E402
    INTENSITY_MIN_SEPARABILITY, MAX_VOLUME_CHANGE, choose_candidate,
)

DOC = REPO / "docs" / "benchmarks.md"


def gated_dice(row: dict, name: str) -> float:
    """Mean true Dice of candidate `name` after the intensity gate of `registration_candidates.conclude`."""
    separability = round(max(row["separability"][name].values()), SCORE_DECIMALS)
    refined = separability >= INTENSITY_MIN_SEPARABILITY
    return float(np.mean(row["candidate_dice_em"][name] if refined else row["candidate_dice"][name]))


def without_bound(evidence):
    """The evidence with every linear stage's volume change plausible: the choice as it was before the bound."""
    return [dict(e, volume_change=1.0) for e in evidence]


class PairReplay(NamedTuple):
    """One pair's mean Dice per row of the table, and the candidates kept with and without the bound."""
    target: str
    reference: str
    previous: float       # locate-first + intensity EM
    textbook: float       # geometry-centred candidate alone
    unbounded: float      # the choice without the volume bound, + gated EM
    default: float        # `choose_candidate`, + gated EM
    chosen: str
    chosen_unbounded: str

    @property
    def pair(self) -> str:
        return f"{self.target}<-{self.reference}"


DICE_ROWS = slice(2, 6)  # previous, textbook, unbounded, default


def replay(rows):
    """Per pair of `oneshot.py` JSON rows, its `PairReplay`."""
    out = []
    for row in rows:
        evidence = row["evidence"]
        chosen = evidence[choose_candidate(evidence)]["name"]
        unbounded = evidence[choose_candidate(without_bound(evidence))]["name"]
        out.append(PairReplay(row["target"], row["reference"], float(np.mean(row["candidate_dice_em"]["locate"])),
                              float(np.mean(row["candidate_dice"]["geometry"])), gated_dice(row, unbounded),
                              gated_dice(row, chosen), chosen, unbounded))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=PATH of a oneshot.py --calibration --json file")
    parser.add_argument("--margin", type=float, default=0.05, help="a pair differs when by more than this Dice")
    parser.add_argument("--pool", help="also one row for all the runs whose NAME contains this (one anatomy)")
    parser.add_argument("--section", default="oneshot-choice")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    lines = ["| pairs | n | previous default (locate-first + EM) | textbook | choice without the volume bound + "
             "gated EM | **default** (bounded choice + gated EM) | default below / above previous by > "
             f"{args.margin} | worst pair vs previous |", "|---|---|---|---|---|---|---|---|"]
    details = []
    all_rows = {}
    for item in args.runs:
        name, path = item.split("=", 1)
        rows = replay(json.loads(Path(path).read_text()))
        all_rows[name] = rows
        table = np.asarray([r[DICE_ROWS] for r in rows])
        gain = table[:, 3] - table[:, 0]
        worst = int(np.argmin(gain))
        lines.append(f"| {name} | {len(rows)} | {table[:, 0].mean():.3f} | {table[:, 1].mean():.3f} | "
                     f"{table[:, 2].mean():.3f} | **{table[:, 3].mean():.3f}** | "
                     f"{int((gain < -args.margin).sum())} / {int((gain > args.margin).sum())} | "
                     f"{gain[worst]:+.3f} ({rows[worst].pair}) |")
        changed = [f"{r.pair} {r.chosen_unbounded} {r.unbounded:.3f} -> {r.chosen} {r.default:.3f}" for r in rows
                   if r.chosen != r.chosen_unbounded]
        below = [f"{r.pair} ({r.chosen} {r.default:.3f} vs {r.previous:.3f})" for r, g in zip(rows, gain)
                 if g < -args.margin]
        details.append(f"- {name}: the bound changed {len(changed)} choice(s)"
                       f"{': ' + '; '.join(changed) if changed else ''}. Below the previous default by > "
                       f"{args.margin}: {'; '.join(below) if below else 'none'}.")
    if args.pool:
        pooled = np.asarray([r[DICE_ROWS] for name, rows in all_rows.items() if args.pool in name for r in rows])
        gain = pooled[:, 3] - pooled[:, 0]
        lines.append(f"| all {args.pool} above | {len(pooled)} | {pooled[:, 0].mean():.3f} | "
                     f"{pooled[:, 1].mean():.3f} | {pooled[:, 2].mean():.3f} | **{pooled[:, 3].mean():.3f}** | "
                     f"{int((gain < -args.margin).sum())} / {int((gain > args.margin).sum())} | {gain.min():+.3f} |")
    command = "python benchmarks/choice_replay.py " + " ".join(f'"{r}"' for r in args.runs)
    text = (f"## Registration choice replayed on many pairs (issue 16, item 1)\n\nCommand: `{command}` (per-pair JSON "
            f"of `oneshot.py --references 1 --calibration`; the engine's `choose_candidate`, volume-change bound "
            f"{MAX_VOLUME_CHANGE:g}x, and its intensity gate {INTENSITY_MIN_SEPARABILITY} replayed on each pair's "
            f"evidence). Mean Dice over the structures, mean over the pairs.\n\n" + "\n".join(lines) + "\n\n"
            + "\n".join(details) + "\n")
    print(text)
    if not args.no_write:
        write_section(DOC, args.section, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
