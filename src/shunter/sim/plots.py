"""Plots for `shunter simulate --plot` (and the helpers `shunter reproduce --plot` draws with), as
PNG, PDF or SVG: the file's suffix says which.

matplotlib is imported inside each function (Agg backend) so the command line starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shunter.files import atomic_output, plot_format

if TYPE_CHECKING:
    from shunter.sim.predict import PlanPrediction


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: object, path: Path) -> None:
    """Write atomically (shunter.files.atomic_output) in the format `path`'s suffix names."""
    file_format = plot_format(path)
    with atomic_output(path, binary=True) as f:
        figure.savefig(f, format=file_format, dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]


def plot_plan_prediction(prediction: PlanPrediction, path: Path) -> None:
    """Per layer: all-to-all and compute of the planned timeline, beside the fair-share layer time."""
    plt = pyplot()
    layers = np.arange(len(prediction.layers))
    a2a = np.array([r.a2a_planned_s for r in prediction.layers]) * 1e3
    compute = np.array([r.compute_s for r in prediction.layers]) * 1e3
    layer = np.array([r.layer_planned_s for r in prediction.layers]) * 1e3
    figure, axis = plt.subplots(figsize=(max(6, len(layers) * 0.6), 4))
    axis.bar(layers - 0.2, a2a, 0.4, label="all-to-all (planned)")
    axis.bar(layers - 0.2, compute, 0.4, bottom=a2a, label="compute (slowest device)")
    axis.bar(layers + 0.2, layer, 0.4, label="layer (planned)", color="grey")
    fair = [r.layer_fair_share_s for r in prediction.layers]
    if all(f is not None for f in fair):
        axis.plot(layers + 0.2, np.array(fair, dtype=float) * 1e3, "kx", label="layer (fair share)")
    axis.set_xticks(layers)
    axis.set_xlabel("MoE layer")
    axis.set_ylabel("ms")
    axis.set_title(f"{prediction.mode} plan: {prediction.total_planned_s * 1e3:.3f} ms per forward")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(figure, path)
    plt.close(figure)
