"""The run configuration: one typed, validated schema that YAML files and ``key=value`` fill.

Validated once at the edge (``load_config``), then trusted everywhere inside. Every field
can be set from the command line with its dotted name, e.g. ``lora.r=16`` or
``fed_alora.a_persistence=keep``; values are parsed as YAML (``ranks=[2,4,8]``, ``true``).
"""

from __future__ import annotations

import typing
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedtune.errors import UsageError
from fedtune.methods import METHODS
from fedtune.methods.client_corrections import FedProxSettings
from fedtune.methods.fed_alora import FedALoRASettings
from fedtune.methods.full_weight import FullWeightSettings, GaLoreSettings
from fedtune.methods.hafl import HAFLSettings
from fedtune.methods.hetlora import HetLoRASettings
from fedtune.methods.scaffold import ScaffoldSettings
from fedtune.methods.server_optimizers import ServerOptSettings
from fedtune.resources import assign_ranks, validate_ranks

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigSection(BaseModel):
    # inf and nan are never meant (lr=.inf would reject every reply and look like a normal run)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1: rounds=true would run one round
        annotation = cls.model_fields[info.field_name].annotation
        kinds = typing.get_args(annotation) or (annotation,)
        if isinstance(value, bool) and bool not in kinds and (int in kinds or float in kinds):
            raise ValueError("must be a number, not true/false")
        return value


class LoraSettings(ConfigSection):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha / r (rsLoRA: alpha / sqrt(r))")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="module names; default per architecture")
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    #: shared: every client starts from one init (required by FFA-LoRA); per_client: own seed each
    init_seed_mode: Literal["shared", "per_client"] = "shared"


class DPSettings(ConfigSection):
    """Central differential privacy on client updates (mean-aggregating methods only)."""

    noise_multiplier: float = Field(0.0, ge=0, description="sigma; 0 disables DP")
    clipping_norm: float = Field(1.0, gt=0, description="C: each client update is clipped to this L2 norm")
    delta: float = Field(1e-5, gt=0, lt=1)


#: how a test client can misbehave (``flower.inject_faults``; runtime/flower/client_app.py)
FAULT_KINDS = ("crash", "nan", "extra_key", "wrong_shape", "wrong_dtype", "huge", "impersonate", "unknown_id", "garbage_array")


class FlowerSettings(ConfigSection):
    """The distributed runtime (``fedtune flower ...``)."""

    client_cpus: float = Field(1.0, gt=0, description="Ray resources per simulated client")
    client_gpus: float = Field(0.0, ge=0)
    ray_cpus: int | None = Field(None, gt=0, description="CPUs Ray may use (default: all)")
    round_timeout: float = Field(3600.0, gt=0, description="seconds to wait for replies each round")
    #: testing aid for the server's defences: "KIND:CLIENT" with KIND one of FAULT_KINDS
    #: (that client misbehaves every round)
    inject_faults: list[str] = []
    #: deployment: Flower node id (from `flwr supernode register`) -> the partition that node
    #: serves; when set, only these nodes take part and a node claiming another partition is refused
    node_partitions: dict[int, int] = {}


    @field_validator("inject_faults")
    @classmethod
    def _check_faults(cls, value: list[str]) -> list[str]:
        kinds = FAULT_KINDS
        for item in value:
            kind, _, client = item.partition(":")
            if kind not in kinds or not client.isdigit():
                raise ValueError(f"fault {item!r} is not KIND:CLIENT with KIND in {', '.join(kinds)}")
        return value


class RunConfig(ConfigSection):
    method: str = "fed-alora"
    model: str = "minilm"
    #: a name, file or Hub id; a list makes a multi-task federation (``partition=natural``: one task per client)
    dataset: str | list[str] = "20newsgroups"
    #: a test file for a ``dataset`` given as a local file (else 10 % is split off)
    test_dataset: str | None = None
    data_dir: str | None = None
    task: Literal["auto", "classification", "generation"] = "auto"
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    image_field: str | None = None
    #: image tasks: the square input side in pixels (default: the model's image processor's)
    image_size: int | None = Field(None, gt=0)

    clients: int = Field(10, gt=0)
    rounds: int = Field(5, gt=0)
    fraction: float = Field(1.0, gt=0, le=1, description="share of clients sampled per round")
    clients_per_round: int | None = Field(None, gt=0, description="overrides fraction")
    local_steps: int | None = Field(10, gt=0)
    local_epochs: float | None = Field(None, gt=0, description="overrides local_steps")
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    max_seq_len: int = Field(128, gt=8)
    max_train_examples: int | None = Field(None, gt=0, description="cap on training rows before partitioning")
    max_eval_examples: int | None = Field(1000, gt=0, description="cap on the global test set")
    max_client_eval_examples: int | None = Field(100, gt=0, description="cap per client test split")
    local_test_fraction: float = Field(0.2, ge=0, lt=1, description="share of each client's rows held out")

    partition: Literal["iid", "dirichlet", "pathological", "natural"] = "dirichlet"
    partition_by: str | None = Field(None, description="column; default label / natural key")
    dirichlet_alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(2, gt=0)

    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    head: Literal["shared", "local", "frozen"] = "shared"
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    #: auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, CPUs with
    #: AVX512-BF16 or AMX), fp32 elsewhere; trainable tensors, optimizer state, aggregation and
    #: the wire stay float32 either way
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: recompute each layer's activations in the backward pass instead of keeping them:
    #: less client memory, about one more forward pass of time; same gradients
    gradient_checkpointing: bool = False
    #: load the frozen base through bitsandbytes (LoRA methods): 4bit = QLoRA's NF4 with double
    #: quantisation and bf16 compute, 8bit = LLM.int8; heads and adapters stay float32
    quantize: Literal["none", "4bit", "8bit"] = "none"
    #: experiment trackers to log to (see fedtune.tracking): any of tensorboard, mlflow, wandb
    tracking: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else RUN_DIR/mlflow)")
    tracking_project: str = Field("fedtune", min_length=1, description="MLflow experiment / W&B project name")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: all cores)")
    eval_every: int = Field(1, gt=0)
    personalised_eval: bool = True
    #: with heterogeneous ranks: also evaluate the model the lowest-rank client receives
    lowrank_eval: bool = False
    #: also evaluate the model every client starts from (the base model, for LoRA methods) on the
    #: global test set before round 1: the floor a study reports beside its metrics (summary ``initial``)
    eval_initial: bool = False
    max_new_tokens: int = Field(256, gt=0, description="generation budget for exact-match evaluation")
    store_memory_mb: float = Field(1024.0, ge=0, description="client state kept in RAM before spilling to disk")
    min_replies: int = Field(1, gt=0, description="valid client replies needed to aggregate a round")
    max_update_norm: float | None = Field(None, gt=0, description="replies with a larger L2 norm are dropped")
    #: no honest adapter or weight entry comes near this; larger values would overflow
    #: float32 in products such as FLoRA's B A (1e30) or an SVD (FlexLoRA)
    max_abs_value: float = Field(1e6, gt=0, description="replies with a larger |entry| are dropped")
    #: a client's num_examples is its weight p_k; without a bound one reply could claim ~all of it
    max_client_examples: int = Field(10_000_000, gt=0, description="replies claiming more examples are dropped")
    dp: DPSettings = DPSettings()
    flower: FlowerSettings = FlowerSettings()
    progress: bool = True

    #: heterogeneous client ranks: a per-client list, or tiers {rank: share} assigned by seed
    ranks: list[int] | dict[int, float] | None = None
    #: the server's rank for heterogeneous methods (default: the largest client rank)
    r_max: int | None = Field(None, gt=0)

    lora: LoraSettings = LoraSettings()
    fed_alora: FedALoRASettings = FedALoRASettings()
    full: FullWeightSettings = FullWeightSettings()
    galore: GaLoreSettings = GaLoreSettings()
    hetlora: HetLoRASettings = HetLoRASettings()
    hafl: HAFLSettings = HAFLSettings()
    server_opt: ServerOptSettings = ServerOptSettings()
    fedprox: FedProxSettings = FedProxSettings()
    scaffold: ScaffoldSettings = ScaffoldSettings()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known methods: {', '.join(sorted(METHODS))}")
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(f"clients_per_round={self.clients_per_round} exceeds clients={self.clients}")
        if self.ranks is not None:
            try:
                ranks = self.client_ranks
            except UsageError as err:
                raise ValueError(str(err)) from None
            if self.r_max is not None and self.r_max < max(ranks):
                raise ValueError(f"r_max={self.r_max} is below the largest client rank {max(ranks)}")
        if self.method == "ffa-lora" and self.lora.init_seed_mode != "shared":
            raise ValueError("ffa-lora needs lora.init_seed_mode=shared: its frozen A must be identical on all clients")
        return self

    @field_validator("ranks")
    @classmethod
    def _check_ranks(cls, value: Any) -> Any:
        return validate_ranks(value)

    @cached_property
    def client_ranks(self) -> list[int]:
        """Every client's LoRA rank (all ``lora.r`` unless ``ranks`` is set)."""
        return assign_ranks(self.ranks, self.clients, self.lora.r, self.seed)

    @property
    def server_rank(self) -> int:
        return self.r_max or max(self.client_ranks)

    @property
    def sampled_per_round(self) -> int:
        if self.clients_per_round is not None:
            return self.clients_per_round
        return max(1, round(self.fraction * self.clients))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["lora.r=16", "rounds=3"]`` -> ``{"lora": {"r": 16}, "rounds": 3}``."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"override {pair!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"override {pair!r} conflicts with another override")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe_validation_error(err: ValidationError) -> str:
    """The first problem of a pydantic error as one line: ``lora.r: must be > 0 (got 0)``."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    got = first.get("input")
    shown = f" (got {got!r})" if first["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
    return f"invalid config: {where}: {message}{shown}"


def load_validated(schema: type[ModelT], path: str | Path | None, overrides: list[str] | None) -> ModelT:
    """Read a YAML file (optional), apply ``key=value`` overrides, validate against ``schema``.

    Every typed config of fedtune (runs, multi-task runs) loads through here, so they share
    one override syntax and one style of one-line errors."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise UsageError(f"config file {path} is not UTF-8 text") from None
        except OSError as err:
            raise UsageError(f"config file {path} cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise UsageError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a mapping of settings")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise UsageError(describe_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run config from a YAML file (optional) and ``key=value`` overrides."""
    return load_validated(RunConfig, path, overrides)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
