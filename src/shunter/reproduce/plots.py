"""PNG plot for `shunter reproduce --plot`: ours beside the paper's, claim by claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shunter.reproduce.claims import Reproduction
from shunter.sim.plots import pyplot, save_figure


def plot_reproduction(reproduction: Reproduction, path: Path) -> None:
    """Ours beside the paper's, one panel per unit (speedups, tok/s, ms, ...); a range is drawn as
    its middle with the range as an error bar."""
    plt = pyplot()
    rows = [r for r in reproduction.rows if r.ours.low is not None and r.paper.low is not None]
    units = list(dict.fromkeys(r.unit for r in rows))
    figure, axes = plt.subplots(1, max(len(units), 1), figsize=(max(6, len(rows) * 1.2), 4.8), squeeze=False)
    for axis, unit in zip(axes[0], units, strict=False):
        group = [r for r in rows if r.unit == unit]
        x = np.arange(len(group))
        for offset, which in ((-0.2, "ours"), (0.2, "paper")):
            figures = [r.ours if which == "ours" else r.paper for r in group]
            low = np.array([f.low for f in figures], dtype=float)
            high = np.array([f.high for f in figures], dtype=float)
            middle = (low + high) / 2
            axis.bar(x + offset, middle, 0.4, yerr=[middle - low, high - middle], capsize=3, label=which)
        for k, row in enumerate(group):
            axis.text(
                k - 0.2,
                0,
                "" if row.reproduced else "no",
                ha="center",
                va="bottom",
                fontsize=7,
                color="white",
            )
        axis.set_xticks(x, [r.label for r in group], rotation=35, ha="right", fontsize=7)
        axis.set_ylabel(unit)
        axis.legend(fontsize=8)
    figure.suptitle(f"reproduce {reproduction.paper}: ours beside the paper's")
    save_figure(figure, path)
    plt.close(figure)
