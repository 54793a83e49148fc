"""What a comparison is: settings (a task and a budget) x variants (a method with its options) x seeds.

Comparisons are written as YAML files (``fedtune.studies.comparison``); the built-in studies
are the files in ``configs/studies/``. A setting's overrides are kept per size (``cpu``, ``gpu``,
or one ``default``); a variant's overrides apply over the setting's, which apply over the base
config file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: the size of a comparison file that names no sizes
DEFAULT_SIZE = "default"


@dataclass(frozen=True)
class Setting:
    name: str
    base: str | None  # the base config as written (relative to the repository root or the file), or inline only
    overrides: dict[str, dict[str, object]]  # size -> overrides (inline base keys first)
    variants: dict[str, dict[str, object]]  # label -> overrides
    base_path: Path | None = None  # where ``base`` was found
    #: label -> seeds run for that variant beyond the study's seeds (where a claim needed more)
    more_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)


#: ``against`` value that compares a variant with its own majority-class floor (per seed)
FLOOR = "majority-class floor"

#: what always answering the most frequent training class scores (global, personalised), from the run's data
FLOOR_COLUMNS = ("majority_class_accuracy", "personal_majority_class_accuracy")

#: what every run reports about its runtime, worth a column when a setting's runs have it
RUNTIME_COLUMNS = ("train_tokens_per_second", "gpu_peak_memory_bytes")


def lower_is_better(metric: str) -> bool:
    """Loss and perplexity (also per client, per rank, per task, the mean or worst over tasks) and a spread over tasks."""
    if metric.startswith("spread_"):
        return True
    for prefix in ("personal_", "lowrank_", "worst_", "mean_"):
        metric = metric.removeprefix(prefix)
    return any(metric == base or metric.startswith(f"{base}_") for base in ("loss", "perplexity"))


@dataclass(frozen=True)
class Claim:
    """A claim the comparison tests: ``variant`` minus ``against`` on ``metric``, paired by seed,
    is expected ``better`` / ``worse`` / ``not-worse``. Without ``variant`` it is only printed.
    The other side may be read on another metric or in another setting (same seed), so that
    a claim like "A's are more alike than B's" is tested within the same runs."""

    text: str
    variant: str | None = None
    against: str | None = None  # default: the study's reference; FLOOR: the run's own majority-class score
    expect: str = "better"
    metric: str | None = None  # default: each setting's compared metric
    settings: tuple[str, ...] = ()  # default: every setting that has the variant
    source: str = ""  # where the claim comes from (a paper, a seed)
    against_metric: str | None = None  # default: ``metric`` (the other side's value of another metric)
    against_setting: str | None = None  # default: the same setting (the other side's runs in another one)


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    settings: tuple[Setting, ...]
    #: per-run metrics worth a column in the report, besides the primary metric
    extra_metrics: tuple[str, ...] = ()
    analyze: bool = False  # run `fedtune analyze` on every run (the initialisation study)
    claims: tuple[Claim, ...] = field(default_factory=tuple)
    #: how the budget or hyper-parameters were chosen, what changed: printed in the report
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: the variant paired differences are taken against (default: the first)
    reference: str | None = None
    #: the metric compared (default: each task's primary metric)
    metric: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    #: a value of the compared metric: the report gives each run's uplink until it first got there
    reach: float | None = None
    #: what the runs are (``fedtune.studies.kinds``): federated runs, or centralised multi-task runs
    kind: str = "federated"


def studies() -> dict[str, Study]:
    """The built-in studies, read from ``configs/studies/*.yaml``."""
    from fedtune.studies.comparison import builtin_studies, load_comparison

    return {name: load_comparison(path) for name, path in builtin_studies().items()}
