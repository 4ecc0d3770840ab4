"""A picture of a result: the label outlined on a few target slices (for the demo and reports)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .frames import choose_slice_axis, to_slices, window_intensities
from .volume import LabelTable, Volume, atomic_write


def render_outlines(image: Volume, label: Volume, table: LabelTable, path, truth: Optional[Volume] = None,
                    max_slices: int = 4, title: str = "") -> Path:
    """PNG: up to `max_slices` slices holding the label, image in grey, each label outlined in its colour
    (solid: result; dashed: `truth` when given). Pixels drawn with their physical aspect ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = choose_slice_axis(image)
    images = to_slices(window_intensities(image.array), axis)
    labels = to_slices(label.array, axis)
    truths = to_slices(truth.array, axis) if truth is not None else None
    filled = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if filled.size == 0:
        filled = np.arange(labels.shape[0])
    chosen = filled[np.linspace(0, filled.size - 1, min(max_slices, filled.size)).round().astype(int)]
    spacing_kji = image.spacing[::-1]
    row_spacing, column_spacing = [spacing_kji[a] for a in range(3) if a != axis]

    figure, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.6), squeeze=False)
    for ax, index in zip(axes[0], chosen):
        ax.imshow(images[index], cmap="gray", aspect=row_spacing / column_spacing, interpolation="nearest")
        for value, info in table.items():
            if np.any(labels[index] == value):
                ax.contour(labels[index] == value, levels=[0.5], colors=[info.color], linewidths=1.2)
            if truths is not None and np.any(truths[index] == value):
                ax.contour(truths[index] == value, levels=[0.5], colors=[info.color], linewidths=0.9,
                           linestyles="dashed")
        ax.set_title(f"slice {index}", fontsize=9)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=info.color, label=info.name) for info in table.values()]
    if truths is not None:
        handles.append(plt.Line2D([], [], color="0.35", linestyle="dashed", label="ground truth (dashed)"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.08, 1, 0.95 if title else 1))
    result = atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return result
