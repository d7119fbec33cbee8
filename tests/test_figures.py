"""Every figure of the book is readable at the book's width: drawn from the results of record, each chapter's figures
(every ``plot_*`` method), the shared figures the chapters use and the landing page's forest plot pass
:func:`vmoe_lib.plots.check_readable` (no wider than the page, no text under 10 points)."""

from __future__ import annotations

import inspect

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import vmoe_lib as vl  # noqa: E402
from vmoe_lib.chapters import CHAPTERS  # noqa: E402


@pytest.fixture(scope="module")
def results_of_record():
    from helpers_foundation import results_of_record

    return {name: results_of_record(chapter) for name, chapter in CHAPTERS.items()}


def _figures(chapter, results):
    for name, method in inspect.getmembers(chapter, inspect.ismethod):
        if not name.startswith("plot_"):
            continue
        first = next(iter(inspect.signature(method).parameters))
        yield name, (lambda m=method, f=first: m("cpu") if f == "preset" else m(results))


@pytest.mark.parametrize("name", sorted(CHAPTERS))
def test_every_chapter_figure_is_readable(name, results_of_record):
    chapter, results = CHAPTERS[name], results_of_record[name]
    drawn = 0
    for figure, make in _figures(chapter, results):
        fig = make()
        try:
            vl.plots.check_readable(fig)
        except ValueError as err:
            raise AssertionError(f"{name}.{figure}: {err}") from None
        finally:
            plt.close(fig)
        drawn += 1
    assert drawn >= 1, f"chapter {name} has no plot_* figure"


def test_the_shared_figures_and_the_forest_plot_are_readable(results_of_record):
    runs = results_of_record["dense_baselines"].results
    rows = vl.book.scoreboard("cpu")
    names = {key: paper.short for key, paper in vl.papers.PAPERS.items()}
    for fig in (vl.plots.accuracy_vs_epochs(runs), vl.plots.accuracy_vs_cost(runs), vl.plots.per_seed_points(runs),
                vl.plots.forest(vl.book.findings(rows), paper_names=names)):
        vl.plots.check_readable(fig)
        plt.close(fig)


def test_the_check_catches_small_text_and_wide_figures():
    fig, ax = plt.subplots(figsize=(7.2, 3))
    ax.set_title("fine")
    vl.plots.check_readable(fig)
    ax.text(0.5, 0.5, "tiny", fontsize=7)
    with pytest.raises(ValueError, match="'tiny' is 7 pt"):
        vl.plots.check_readable(fig)
    fig.set_figwidth(9)
    with pytest.raises(ValueError, match="9.00 in wide"):
        vl.plots.check_readable(fig)
    plt.close(fig)
