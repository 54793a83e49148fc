"""Comparisons and studies: several methods x seeds on one or more settings, a CSV of every
run and a Markdown report with paired statistics.

    definitions.py  what a comparison is (settings, variants, sizes, reference, claims)
    comparison.py   comparison files (YAML): schema, validation, the built-in studies' files
    runner.py       runs the grid (resumable) and collects one row per run
    report.py       tables, paired differences with 95 % intervals, plots, Pareto view
    command.py      ``fedtune compare`` and ``fedtune study``
"""

from fedtune.studies.definitions import Setting, Study, studies

__all__ = ["Setting", "Study", "studies"]
