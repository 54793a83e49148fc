"""Comparison files: which methods, on which base config, with which seeds, against which reference.

A comparison file is YAML, validated like a run config::

    name: my-comparison          # default: the file's name
    kind: federated              # or multitask: `fedtune multitask` runs (base: a multi-task config)
    base: configs/my-job.yaml    # a run config file, or inline keys: {model: minilm, dataset: ./rows.jsonl}
    overrides: {rounds: 10}      # applied to every run (optional)
    seeds: [0, 1, 2]
    reference: FedIT             # paired differences are taken against it (default: the first variant)
    metric: accuracy             # default: the task's primary metric
    reach: 0.4                   # optional: report the uplink each run needed to first reach this metric value
    variants:
      FedIT: {method: fedit}
      FFA-LoRA: {method: ffa-lora, lr: 0.01}
      HAFL freezing: {method: hafl, hafl.scheme: freezing, ranks: {4: 0.5, 8: 0.5}}
    settings:                    # optional: several tasks or budgets, each with its own base/overrides
      sst2: {base: configs/glue.yaml, overrides: {dataset: glue/sst2},
             more_seeds: {FedIT: [3, 4]}}   # seeds beyond `seeds` for some variants (a straddling claim)
    sizes: {cpu: {...}, gpu: {...}}   # optional named budgets (``--size``), per file or per setting
    claims:                      # what the comparison tests: a sentence, or a paired test with a verdict
      - sharing B is enough
      - {text: FFA-LoRA matches FedIT, variant: FFA-LoRA, against: FedIT, expect: not-worse, source: seed 001}
      - {text: personalised beats the floor, variant: Fed-ALoRA, against: majority-class floor, metric: personal_accuracy}
      - {text: A is more alike than B, variant: LoRA, metric: similarity_A, against_metric: similarity_B}
      - {text: a shared seed makes A alike, variant: LoRA, metric: similarity_A, settings: [same-seed],
         against_setting: diff-seeds}   # the same variant and seed in another setting
    notes: [...]

Everything a run would refuse (an unknown method or key, a missing base file) is found here,
before any run starts, and named by its variant. The built-in studies are such files
(``configs/studies/*.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from fedtune.config import ConfigSection, describe_validation_error
from fedtune.errors import UsageError
from fedtune.studies.definitions import DEFAULT_SIZE, FLOOR, Claim, Setting, Study, lower_is_better

ROOT = Path(__file__).resolve().parents[3]
STUDY_DIR = ROOT / "configs" / "studies"

Overrides = dict[str, Any]


class SettingSpec(ConfigSection):
    base: str | Overrides | None = None  # default: the file's base
    overrides: Overrides = {}
    sizes: dict[str, Overrides] = {}
    variants: dict[str, Overrides] | None = None  # default: the file's variants
    # seeds beyond the file's for some variants: the two sides of a claim whose interval straddled zero
    more_seeds: dict[str, list[int]] = {}


class ClaimSpec(ConfigSection):
    text: str
    variant: str | None = None
    against: str | None = None
    expect: Literal["better", "worse", "not-worse"] = "better"
    metric: str | None = None
    against_metric: str | None = None
    against_setting: str | None = None
    settings: list[str] = []
    source: str = ""


class ComparisonFile(ConfigSection):
    name: str | None = None
    kind: Literal["federated", "multitask"] = "federated"
    question: str = ""
    base: str | Overrides | None = None
    overrides: Overrides = {}
    sizes: dict[str, Overrides] = {}
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    variants: dict[str, Overrides] | None = None
    reference: str | None = None
    metric: str | None = None
    settings: dict[str, SettingSpec] | None = None
    extra_metrics: list[str] = []
    reach: float | None = None
    analyze: bool = False
    claims: list[Any] = []  # sentences, or ClaimSpec mappings (checked below, one clear error each)
    notes: list[str] = []

    @field_validator("claims", mode="before")
    @classmethod
    def _claims_are_sentences_or_tests(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError("must be a list of sentences or {text, variant, against, expect, metric} mappings")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):
                try:
                    out.append(ClaimSpec.model_validate(item))
                except ValidationError as err:
                    raise ValueError(f"claim {i + 1}: {describe_validation_error(err).removeprefix('invalid config: ')}") from None
            else:
                raise ValueError(f"claim {i + 1} must be a sentence or a mapping, got {type(item).__name__}")
        return out

    @field_validator("variants", mode="before")
    @classmethod
    def _variants_are_mappings(cls, value: Any) -> Any:
        for label, overrides in (value or {}).items() if isinstance(value, dict) else ():
            if not isinstance(overrides, dict):
                raise ValueError(f"variant {label!r} must be a mapping of settings, like {{method: fedit}}")
        return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; two variants with one name must be an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UsageError(f"{key!r} appears twice in one mapping (line {key_node.start_mark.line + 1}); names must be unique")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"comparison file not found: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None


def is_comparison_file(path: Path) -> bool:
    """A comparison file names its variants (or settings); a run config does not."""
    data = read_yaml(path)
    return isinstance(data, dict) and ("variants" in data or "settings" in data)


def load_comparison(path: Path) -> Study:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping (base, seeds, variants, ...)")
    try:
        spec = ComparisonFile.model_validate(data)
    except ValidationError as err:
        raise UsageError(f"{path}: {describe_validation_error(err).removeprefix('invalid config: ')}") from None
    return to_study(spec, path.stem, path.parent)


def _resolve_base(base: str | Overrides | None, folder: Path, where: str) -> tuple[str | None, Path | None, Overrides]:
    """(the base as written, the file it names, inline keys). A relative path is looked up
    from the working directory, then beside the comparison file, then in the repository."""
    if base is None or isinstance(base, dict):
        return None, None, dict(base or {})
    for candidate in (Path(base), folder / base, ROOT / base):
        if candidate.is_file():
            return base, candidate, {}
    raise UsageError(f"{where}: base config file not found: {base}")


def to_study(spec: ComparisonFile, default_name: str, folder: Path) -> Study:
    settings_in = spec.settings or {"main": SettingSpec()}
    settings = []
    for name, item in settings_in.items():
        variants = item.variants if item.variants is not None else spec.variants
        if not variants:
            raise UsageError(f"setting {name!r} has no variants (give variants: at the top or in the setting)")
        base, base_path, inline = _resolve_base(item.base if item.base is not None else spec.base, folder, f"setting {name!r}")
        sizes = {**spec.sizes, **item.sizes} or {DEFAULT_SIZE: {}}
        overrides = {size: {**inline, **spec.overrides, **item.overrides, **extra} for size, extra in sizes.items()}
        unknown = [label for label in item.more_seeds if label not in variants]
        if unknown:
            raise UsageError(f"setting {name!r}: more_seeds names {unknown[0]!r}, not a variant (variants: {', '.join(variants)})")
        more = {label: tuple(s for s in seeds if s not in spec.seeds) for label, seeds in item.more_seeds.items()}
        settings.append(Setting(name, base, overrides, dict(variants), base_path, {k: v for k, v in more.items() if v}))
    labels = [label for s in settings for label in s.variants]
    reference = spec.reference if spec.reference is not None else labels[0]
    missing = [s.name for s in settings if reference not in s.variants]
    if missing:
        raise UsageError(f"reference {reference!r} is not a variant of setting {missing[0]!r} (variants: {', '.join(settings[0].variants)})")
    claims = tuple(_claim(c, settings, reference) for c in spec.claims)
    if spec.kind == "multitask" and (spec.metric is not None or spec.reach is not None or spec.analyze):
        raise UsageError("a multitask comparison compares the mean score over tasks: it takes no 'metric', 'reach' or 'analyze'")
    return Study(
        spec.name or default_name,
        spec.question,
        tuple(settings),
        extra_metrics=tuple(spec.extra_metrics),
        analyze=spec.analyze,
        claims=claims,
        notes=tuple(spec.notes),
        reference=reference,
        metric=spec.metric,
        seeds=tuple(spec.seeds),
        reach=spec.reach,
        kind=spec.kind,
    )


def _claim(spec: str | ClaimSpec, settings: list[Setting], reference: str) -> Claim:
    if isinstance(spec, str):
        return Claim(spec)
    names = [s.name for s in settings]
    unknown = [name for name in spec.settings if name not in names]
    if unknown:
        raise UsageError(f"claim {spec.text!r}: no setting {unknown[0]!r} (settings: {', '.join(names)})")
    if spec.metric and spec.against_metric and lower_is_better(spec.metric) != lower_is_better(spec.against_metric):
        raise UsageError(f"claim {spec.text!r}: {spec.metric} and {spec.against_metric} do not improve in the same direction")
    if spec.against_setting is not None and spec.against_setting not in names:
        raise UsageError(f"claim {spec.text!r}: no setting {spec.against_setting!r} (settings: {', '.join(names)})")
    if (spec.against_metric or spec.against_setting) and spec.variant is None:
        raise UsageError(f"claim {spec.text!r}: 'against_metric' and 'against_setting' need a 'variant'")
    chosen = [s for s in settings if not spec.settings or s.name in spec.settings]
    # against another metric or setting, the natural other side is the same variant there
    against = spec.against or (spec.variant if spec.against_metric or spec.against_setting else reference)
    for label in (spec.variant, against if against != FLOOR else None):
        if label is not None and not any(label in s.variants for s in chosen):
            raise UsageError(f"claim {spec.text!r}: {label!r} is not a variant (variants: {', '.join(chosen[0].variants)})")
    if spec.variant is None and spec.against is not None:
        raise UsageError(f"claim {spec.text!r}: 'against' needs a 'variant' to compare with it")
    if spec.against_setting is not None and against != FLOOR:
        other = next(s for s in settings if s.name == spec.against_setting)
        if against not in other.variants:
            raise UsageError(f"claim {spec.text!r}: {against!r} is not a variant of setting {other.name!r}")
    return Claim(
        spec.text, spec.variant, against, spec.expect, spec.metric, tuple(spec.settings), spec.source,
        spec.against_metric, spec.against_setting,
    )  # fmt: skip


def quick_comparison(config: Path, methods: list[str], seeds: list[int]) -> Study:
    """``fedtune compare CONFIG.yaml --methods a b c``: one variant per method, the first the reference."""
    if not methods:
        raise UsageError("--methods needs at least one method (or give a comparison file)")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods names a method twice: {methods}")
    spec = ComparisonFile(base=str(config), seeds=seeds, variants={m: {"method": m} for m in methods})
    return to_study(spec, f"{config.stem}-" + "-vs-".join(methods), config.parent)


def validate(study: Study, size: str, extra: list[str]) -> None:
    """Build every variant's config once, so a bad one is named before any run starts."""
    from fedtune.studies.kinds import KINDS
    from fedtune.studies.runner import override_list

    for setting in study.settings:
        if size not in setting.overrides:
            raise UsageError(f"setting {setting.name!r} has no size {size!r} (sizes: {', '.join(setting.overrides)})")
        for label, variant in setting.variants.items():
            try:
                KINDS[study.kind].load(setting.base_path, override_list({**setting.overrides[size], **variant}) + extra)
            except UsageError as err:
                raise UsageError(f"variant {label!r} of setting {setting.name!r}: {str(err).removeprefix('invalid config: ')}") from None


def builtin_studies() -> dict[str, Path]:
    return {p.stem: p for p in sorted(STUDY_DIR.glob("*.yaml"))}
