"""Plots: every curve of a many-variant study is drawn distinguishably."""

from pathlib import Path

import pytest

import fedtune.plots as plots
from fedtune.plots import curve_style, line_plot


def test_forty_curves_get_forty_distinct_styles():
    styles = {tuple(sorted(curve_style(i).items())) for i in range(40)}
    assert len(styles) == 40


def test_the_eleventh_curve_reuses_a_colour_but_not_its_look():
    first, eleventh = curve_style(0), curve_style(10)
    assert first["color"] == eleventh["color"]
    assert (first["marker"], first["linestyle"]) != (eleventh["marker"], eleventh["linestyle"])


@pytest.mark.parametrize("count", [1, 3, 12])
def test_line_plot_writes_a_png_for_any_number_of_curves(tmp_path: Path, count: int):
    curves = {f"variant {i}": ([2, 4, 6, 8], [0.1 * i, 0.2, 0.3, 0.4]) for i in range(count)}
    path = line_plot(curves, "round", "accuracy", tmp_path / "plot.png", integer_x=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_line_plot_draws_twelve_curves_each_in_its_own_style(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What the optimisers study's 12 variants need: no two drawn lines alike (colour, marker, line style)."""
    drawn: list[tuple[str, str, str]] = []
    real_savefig = plots.savefig

    def capture(fig, path, **kwargs):
        drawn.extend((str(line.get_color()), str(line.get_marker()), str(line.get_linestyle())) for line in fig.axes[0].get_lines())
        real_savefig(fig, path, **kwargs)

    monkeypatch.setattr(plots, "savefig", capture)
    curves = {f"variant {i}": ([2, 4, 6, 8], [0.1 * i, 0.2, 0.3, 0.4]) for i in range(12)}
    line_plot(curves, "round", "accuracy", tmp_path / "plot.png", integer_x=True)
    assert len(drawn) == 12
    assert len(set(drawn)) == 12
