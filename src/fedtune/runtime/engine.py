"""What every runtime shares: building a federation from a config, and one client's turn.

The simulator (``simulator.py``) and the Flower ClientApp both call :func:`client_turn`, so
a method trains identically in both: same seeds, same batches, same optimizer.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.config import RunConfig
from fedtune.data.federated import FederatedData, PartitionPlan, encode_plan, plan_partitions
from fedtune.errors import UsageError
from fedtune.methods import METHODS, FederatedMethod, build_method
from fedtune.methods.client_corrections import client_hooks
from fedtune.models import LoadedModel, ModelBinding, bind_full, bind_lora, load_model
from fedtune.models.export import save_merged_weights
from fedtune.runtime.evaluation import evaluate
from fedtune.runtime.local_training import LocalResult, resolve_precision, steps_for, train_locally
from fedtune.state import LORA_A_SUFFIX, LORA_B_SUFFIX, WIRE_DTYPES, State, is_bookkeeping, num_bytes, through_wire


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (run seed, round, client, ...), stable across runs."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sample_clients(num_clients: int, per_round: int, seed: int, round_num: int) -> list[int]:
    """The clients sampled in ``round_num`` (sorted), reproducible from the run seed."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(derive_seed(seed, round_num, 0xC11E))
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_determinism(config: Any) -> None:
    """Threads, deterministic kernels and the global seed, from any config with
    ``threads`` and ``seed`` (run and multi-task configs alike)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.seed)


@dataclass
class Federation:
    """Everything a runtime needs, built once: data, model, bound parameters, method."""

    config: RunConfig
    method: FederatedMethod
    data: FederatedData
    loaded: LoadedModel
    binding: ModelBinding
    device: torch.device
    wire_dtype: torch.dtype
    #: the compute precision actually used (``precision=auto`` resolved for ``device``)
    precision: str = "fp32"
    _shared_initial: dict[int, State] = field(default_factory=dict, repr=False)

    @property
    def pad_id(self) -> int:
        return self.loaded.pad_token_id

    def rank_of(self, client_id: int | None) -> int:
        """A client's LoRA rank; ``None`` is the server (``r_max``)."""
        if not self.method.uses_lora:
            return self.binding.active_rank
        if client_id is None:
            return self.config.server_rank
        chosen = self.method.model_rank(client_id)
        return self.config.client_ranks[client_id] if chosen is None else chosen

    def initial_state(self, client_id: int | None = None) -> State:
        """The trainable state a client (``None``: the server) starts from before round 1.

        With ``lora.init_seed_mode=shared`` (default) every client and the server share one
        init derived from the run seed (at their own rank); ``per_client`` gives each its own.
        """
        rank = self.rank_of(client_id)
        if self.config.lora.init_seed_mode == "per_client" and client_id is not None:
            return self.binding.initial_state(derive_seed(self.config.seed, 0x1A17, client_id), rank)
        if rank not in self._shared_initial:
            self._shared_initial[rank] = self.binding.initial_state(derive_seed(self.config.seed, 0x1A17), rank)
        return self._shared_initial[rank]

    def evaluate(self, state: State, examples: list, scored: list) -> dict[str, float]:
        """Load ``state`` into the model and measure the task's metrics on ``examples``."""
        c = self.config
        self.binding.load(state)
        return evaluate(
            self.binding.model, self.data.task.metric, examples, scored, c.eval_batch_size, self.pad_id,
            self.device, self.precision, self.loaded.tokenizer, c.max_new_tokens,
        )  # fmt: skip

    def save(self, state: State, root: Path) -> Path:
        """Write ``state`` under ``root/<export format>``: a PEFT ``adapter``, a full ``model``,
        or the ``merged`` target weights (FLoRA, FedEx-LoRA)."""
        fmt = self.method.export_format
        target = root / fmt
        if fmt == "merged":
            save_merged_weights(self.method.export_state(state), target)
        else:
            self.binding.export(self.method.export_state(state), target, self.loaded.preprocessor)
        return target

    def steps_for_client(self, client_id: int) -> int:
        c = self.config
        return steps_for(self.data.clients[client_id].num_examples, c.batch_size, c.local_steps, c.local_epochs)


def bind_model(method: FederatedMethod, loaded: LoadedModel, task_kind: str, config: RunConfig) -> ModelBinding:
    """The parameters the method's clients train, bound on the loaded model."""
    if not method.uses_lora:
        return bind_full(loaded, config.full.scope, config.lora.target_modules)
    distinct = set(config.client_ranks)
    if len(distinct) > 1 and not method.supports_heterogeneous_ranks:
        raise UsageError(
            f"method {method.name} needs equal client ranks (got {sorted(distinct)}); "
            "heterogeneous methods: " + ", ".join(n for n, m in METHODS.items() if m.supports_heterogeneous_ranks)
        )
    ranks = distinct | {config.server_rank}
    try:
        if method.adapter_kind == "decomposed":
            from fedtune.models.decomposed import bind_decomposed

            binding = bind_decomposed(loaded, task_kind, config.lora, ranks, config.fed_alora.d_m)
        else:
            binding = bind_lora(loaded, task_kind, config.lora, ranks, bind_base=method.binds_base_weights)
    except ValueError as err:  # target modules that match nothing, or that peft cannot adapt
        raise UsageError(f"{str(err).splitlines()[0]} (lora.target_modules={config.lora.target_modules})") from None
    check_ranks_fit(binding)
    return binding


def check_ranks_fit(binding: ModelBinding) -> None:
    """A LoRA rank above a target layer's smaller side adds parameters and no capacity."""
    for rank, params in sorted(binding.slots.items()):
        for key in params:
            if not key.endswith(LORA_A_SUFFIX):
                continue
            module = key[: -len(LORA_A_SUFFIX)]
            b = params.get(module + LORA_B_SUFFIX, params.get(module + ".alora_B2"))  # decomposed: B2 is d_out x r
            d_in, d_out = params[key].shape[1], (b.shape[0] if b is not None else params[key].shape[1])
            if rank > min(d_in, d_out):
                raise UsageError(f"LoRA rank {rank} exceeds the size of {module} ({d_out} x {d_in}); use a rank <= {min(d_in, d_out)}")


def check_sequence_length(loaded: LoadedModel, max_seq_len: int) -> None:
    """Longer inputs than the model has positions for fail deep inside its forward pass."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_seq_len > limit:
        raise UsageError(f"max_seq_len={max_seq_len} exceeds the {limit} positions of model {loaded.name_or_path}")


def enable_gradient_checkpointing(loaded: LoadedModel) -> None:
    """transformers' own (activation) checkpointing of every layer, non-reentrant: it works with a frozen base
    (LoRA: no input needs grad) and keeps the RNG state, so dropout masks and gradients match a
    run without it."""
    model = loaded.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UsageError(f"model {loaded.name_or_path} does not support gradient_checkpointing")
    base.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5's name for it


def check_method_config(method: FederatedMethod, config: RunConfig) -> None:
    """Settings a method cannot honour, refused before anything is loaded or written."""
    if config.server_opt.name != "none" and method.server_opt_refusal:
        raise UsageError(f"server_opt.name={config.server_opt.name} has no meaning for {method.name}: {method.server_opt_refusal}")
    if config.quantize != "none" and not method.uses_lora:
        raise UsageError(f"quantize={config.quantize} keeps the base frozen in 4/8 bits; {method.name} trains the base weights (use a LoRA method)")
    if config.quantize != "none" and method.binds_base_weights:
        raise UsageError(f"quantize={config.quantize}: {method.name} merges updates into the base weights, which a quantised base cannot hold")
    if config.dp.noise_multiplier > 0 and not method.aggregates_by_mean:
        mean_methods = sorted(n for n, m in METHODS.items() if m.aggregates_by_mean)
        raise UsageError(f"central DP needs a mean-aggregating method ({', '.join(mean_methods)}), not {method.name}")


def build_federation(
    config: RunConfig, plan: PartitionPlan | None = None, only_clients: set[int] | None = None, global_test: bool = True
) -> Federation:
    """Data first (cheap, validates input), then the model, then bind parameters.

    ``only_clients`` / ``global_test`` limit tokenisation to what a process needs (a Flower
    client its own shard, the Flower server the global test set)."""
    set_determinism(config)
    plan = plan or plan_partitions(config)
    task = plan.task
    device = pick_device(config.device)
    method = build_method(config)
    check_method_config(method, config)
    loaded = load_model(
        config.model, task.kind, task.num_labels, seed=config.seed, modality=task.modality, image_size=config.image_size,
        quantize=config.quantize, device=str(device),
    )  # fmt: skip
    if task.modality == "text":
        check_sequence_length(loaded, config.max_seq_len)
    binding = bind_model(method, loaded, task.kind, config)
    binding.to(device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(loaded)
    data = encode_plan(plan, loaded.encoder, config.max_seq_len, only_clients, global_test)
    precision = resolve_precision(config.precision, device)
    return Federation(config, method, data, loaded, binding, device, WIRE_DTYPES[config.wire_dtype], precision)


@dataclass
class ClientTurn:
    upload: State
    local: State
    result: LocalResult
    bytes_up: int


def client_turn(
    fed: Federation,
    client_id: int,
    round_num: int,
    received: State,
    local: State,
    on_step: Callable[[], None] | None = None,
) -> ClientTurn:
    """One client's round: assemble the start state, train locally, split upload / local.

    ``received`` is what arrived over the wire (already in its wire precision).
    """
    method, binding, config = fed.method, fed.binding, fed.config
    start = method.client_start(received, local, fed.initial_state(client_id), client_id)
    # "_"-prefixed keys are the method's client-side bookkeeping (importance scores, chosen
    # components): they travel from client_start to client_finish, not into the model.
    model_keys = [k for k in start if not is_bookkeeping(k)]
    binding.load({k: start[k] for k in model_keys})
    params = binding.set_trainable([k for k in model_keys if method.trains(k)])
    hooks = client_hooks(method, start, local, config.fedprox.mu)
    optimizer = method.make_optimizer(params, config.lr, config.weight_decay, binding.matrix_keys)
    turn_seed = derive_seed(config.seed, round_num, client_id)
    torch.manual_seed(turn_seed)  # dropout
    generator = torch.Generator().manual_seed(turn_seed)  # batch order
    result = train_locally(
        binding.model,
        params,
        optimizer,
        fed.data.clients[client_id].train,
        fed.steps_for_client(client_id),
        config.batch_size,
        generator,
        fed.pad_id,
        fed.device,
        precision=fed.precision,
        max_grad_norm=config.max_grad_norm,
        hooks=hooks,
        on_step=on_step,
    )
    trained = binding.read(model_keys)
    trained.update({k: v for k, v in start.items() if is_bookkeeping(k)})
    if hooks is not None:
        trained.update(hooks.extras())
    upload, new_local = method.client_finish(trained, start)
    return ClientTurn(through_wire(upload, fed.wire_dtype), new_local, result, num_bytes(upload, fed.wire_dtype))


def describe(fed: Federation) -> dict[str, Any]:
    """Sizes worth printing and recording: trainable and communicated parameters."""
    initial = fed.initial_state(0)
    shared = {k: v for k, v in initial.items() if fed.method.is_shared(k)}
    return {
        "trainable_params": sum(v.numel() for k, v in initial.items() if fed.method.trains(k)),
        "shared_params": sum(v.numel() for v in shared.values()),
        "total_params": sum(p.numel() for p in fed.binding.model.parameters()),
        "client_examples": [c.num_examples for c in fed.data.clients],
        "precision": fed.precision,
        "quantize": fed.config.quantize,
        # the model's parameters and buffers as stored (base and adapters; 4-bit weights at half a byte)
        "model_bytes": sum(t.numel() * t.element_size() for t in (*fed.loaded.model.parameters(), *fed.loaded.model.buffers())),
        **majority_class_floors(fed.data),
    }


def majority_class_floors(data: FederatedData) -> dict[str, float]:
    """What always answering the most frequent training class scores, on the sets the run
    evaluates: the pooled training data's class on the global test set, and each client's own
    class on its own test split (mean over clients, like personalised accuracy). On label-skewed
    clients the personal floor is high, and a personalised accuracy is judged against it."""
    if data.task.kind != "classification":
        return {}
    floors: dict[str, float] = {}

    def majority(examples: list) -> int:
        return Counter(int(e.labels) for e in examples).most_common(1)[0][0]

    pooled = [e for c in data.clients for e in c.train]
    if pooled and data.test:
        label = majority(pooled)
        floors["majority_class_accuracy"] = sum(int(e.labels) == label for e in data.test) / len(data.test)
    personal = [
        sum(int(e.labels) == majority(c.train) for e in c.test) / len(c.test) for c in data.clients if c.train and c.test
    ]
    if personal:
        floors["personal_majority_class_accuracy"] = sum(personal) / len(personal)
    return floors
