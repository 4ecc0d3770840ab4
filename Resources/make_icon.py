"""Draws the extension icon (128x128 PNG): a reference slice's contour carried onto a target slice.

Run once after changing it: python Resources/make_icon.py  (needs matplotlib; the PNG is committed).
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "SlicerProxyPrompt" / "Resources" / "Icons" / "ProxyPrompt.png"


def main():
    figure = plt.figure(figsize=(1.28, 1.28), dpi=100)
    axes = figure.add_axes([0, 0, 1, 1])
    axes.set_xlim(0, 128)
    axes.set_ylim(0, 128)
    axes.axis("off")
    angle = np.linspace(0, 2 * np.pi, 200)
    for x0, y0, shade in ((10, 42, "#3b4a63"), (42, 10, "#1f2a3a")):  # reference slice behind, target in front
        axes.add_patch(plt.Rectangle((x0, y0), 76, 76, facecolor=shade, edgecolor="#d8dee9", linewidth=1.5,
                                     joinstyle="round"))
    axes.plot(48 + 20 * np.cos(angle), 80 + 15 * np.sin(angle), color="#e0a030", linewidth=2, linestyle="--")
    axes.fill(80 + 22 * np.cos(angle), 48 + 17 * np.sin(angle), color="#e0a030", alpha=0.85)
    axes.annotate("", xy=(70, 60), xytext=(54, 74), arrowprops=dict(arrowstyle="->", color="white", linewidth=2))
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUTPUT, dpi=100, transparent=True)
    print(OUTPUT)


if __name__ == "__main__":
    main()
