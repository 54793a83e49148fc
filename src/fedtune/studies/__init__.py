"""Studies: several methods x seeds on one task, a CSV of every run and a Markdown report.

    definitions.py  the studies (settings, variants, budgets) and the claims they test
    runner.py       runs the grid (resumable) and collects one row per run
    report.py       mean +- std tables, plots over seeds, hardware and wall time
"""

from fedtune.studies.definitions import STUDIES, Setting, Study

__all__ = ["STUDIES", "Setting", "Study"]
