"""Output files: a figure is written in the format its suffix names, and output paths are checked
before the work."""

from __future__ import annotations

from pathlib import Path

import pytest

from shunter.errors import ShunterError
from shunter.files import check_plot_path, plot_format
from shunter.sim.plots import pyplot, save_figure
from shunter.trace.synthetic import zipf_trace
from tests.cli.harness import run_in

# the first bytes of each format (the oracle: what the file is, whatever its name says)
MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}


@pytest.mark.parametrize("suffix", sorted(MAGIC))
def test_a_figure_is_saved_in_the_format_its_suffix_names(tmp_path: Path, suffix: str) -> None:
    plt = pyplot()
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    save_figure(figure, tmp_path / f"fig.{suffix}")
    plt.close(figure)
    assert (tmp_path / f"fig.{suffix}").read_bytes().startswith(MAGIC[suffix])


def test_simulate_plot_pdf_writes_a_pdf(tmp_path: Path) -> None:
    cluster = Path(__file__).resolve().parents[2] / "examples" / "cluster-homogeneous.toml"
    zipf_trace(2, 128, 8, 2, 1.2, 0.6, 0).save(tmp_path / "t.npz")
    argv = ["plan", "--cluster", str(cluster), "--trace", "t.npz", "--out", "p.json"]
    code, _, err = run_in(argv, tmp_path)
    assert code == 0, err
    argv = ["simulate", "--cluster", str(cluster), "--plan", "p.json", "--plot", "fig.pdf"]
    code, _, err = run_in(argv, tmp_path)
    assert code == 0, err
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF")


def test_plot_format_refuses_a_suffix_it_cannot_draw() -> None:
    with pytest.raises(ShunterError, match=r"--plot: .*\.png, \.pdf, \.svg"):
        plot_format("figure.gif", "--plot")


def test_check_plot_path_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / "fig.png").mkdir()
    with pytest.raises(ShunterError, match="is a directory"):
        check_plot_path(tmp_path / "fig.png", "--plot")
