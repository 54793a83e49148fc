"""Independent plain-torch references for the heterogeneous-rank methods.

Every expected value here is computed by the reference functions in this file from the
formulas of METHODS.md ("Heterogeneous ranks") and the conventions the methods document
(one rank scale, HAFL's global importance, FLoRA's wire precision). The methods under test
are only driven through their public round interface:

    received = method.download(server, k)
    start    = method.client_start(received, local_k, initial_k, k)
    trained  = <a seeded perturbation of start (HAFL: seeded gradients through its hooks)>
    upload, local_k = method.client_finish(trained, start)
    server   = method.aggregate(server, [ClientUpload(k, n_k, upload), ...])

on two LoRA modules of different shapes, 4 clients with unequal n_k and ranks 2/4/8,
several rounds with partial participation, float64.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from fedtune.methods import ClientUpload
from fedtune.methods.flexlora import FlexLoRA
from fedtune.methods.flora import FLoRA
from fedtune.methods.hafl import HAFL, HAFLSettings
from fedtune.methods.hetlora import HetLoRA, HetLoRASettings
from fedtune.resources import RankPlan

MODULES = {"layer.q": (12, 10), "layer.down": (7, 9)}  # module: (d_out, d_in)
R, ALPHA, BETA = 8, 16.0, 0.85
A_, B_, BASE = ".lora_A", ".lora_B", ".base_layer.weight"
INDEX, SCORE = ".hafl_index", ".hafl_score"
RANKS, N = (2, 4, 8, 4), (30, 50, 20, 70)
# partial participation: client 3 misses two rounds in a row, client 2 sits out rounds 2 and 4
SCHEDULE = [[0, 1, 2, 3], [0, 1], [0, 2], [1, 3], [0, 1, 2, 3]]
F64 = torch.float64


# -- plain helpers ---------------------------------------------------------------------------
def s(r: int, rslora: bool) -> float:
    return ALPHA / (math.sqrt(r) if rslora else r)


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def lora(rank: int, seed: int, b_zero: bool = False, base: bool = False) -> dict:
    """Rank-``rank`` factors for every module (A random, B random or zero), optionally W0."""
    state = {}
    for i, (m, (d_out, d_in)) in enumerate(MODULES.items()):
        state[m + A_] = randn((rank, d_in), 100 * seed + 2 * i)
        state[m + B_] = torch.zeros(d_out, rank, dtype=F64) if b_zero else 0.5 * randn((d_out, rank), 100 * seed + 2 * i + 1)
        if base:
            state[m + BASE] = randn((d_out, d_in), 7000 + i)  # the same W0 on every client
    return state


def perturb(method, start: dict, seed: int) -> dict:
    """'Training': start + 0.1 * seeded noise on the LoRA keys the method trains (engine order).

    Like any gradient step, it leaves a component with A[i] = 0 and B[:, i] = 0 at exactly 0
    (B[:, i] only moves where A[i] != 0 and A[i] only where B[:, i] != 0)."""
    trained = {}
    for j, key in enumerate(sorted(start)):
        value = start[key].clone()
        if not key.startswith("_") and key.endswith((A_, B_)) and method.trains(key):
            m = key[: -len(A_)]
            if key.endswith(A_):
                live = (start[m + B_] != 0).any(dim=0).to(F64)[:, None]
            else:
                live = (start[m + A_] != 0).any(dim=1).to(F64)[None, :]
            value = value + 0.1 * randn(value.shape, 10_000 * seed + j) * live
        trained[key] = value
    return trained


def weights(sampled, n=N) -> dict:
    total = sum(n[k] for k in sampled)
    return {k: n[k] / total for k in sampled}


def product(state: dict, m: str, scale: float) -> torch.Tensor:
    return scale * state[m + B_] @ state[m + A_]


def truncated_svd(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * sv[:rank] @ vh[:rank]


def lora_part(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith((A_, B_)) and not k.startswith("_")}


# -- HetLoRA ---------------------------------------------------------------------------------
def hetlora_ref_download(ref: dict, r: int, rs: bool) -> dict:
    out = {}
    for m in MODULES:
        out[m + A_] = ref[m + A_][:r].clone()
        out[m + B_] = ref[m + B_][:, :r] * s(R, rs) / s(r, rs)
    return out


def hetlora_ref_aggregate(trained: dict, mode: str, rs: bool) -> dict:
    p = weights(trained)
    out = {}
    for m, (d_out, d_in) in MODULES.items():
        padded = {}
        for k, t in trained.items():
            r = RANKS[k]
            a, b = torch.zeros(R, d_in, dtype=F64), torch.zeros(d_out, R, dtype=F64)
            a[:r], b[:, :r] = t[m + A_], t[m + B_] * s(r, rs) / s(R, rs)
            padded[k] = (a, b)
        if mode == "norm":
            norms = {k: torch.linalg.norm(b @ a).item() for k, (a, b) in padded.items()}
            w = {k: norms[k] / sum(norms.values()) for k in padded}
        else:
            w = p
        out[m + A_] = sum(w[k] * a for k, (a, b) in padded.items())
        out[m + B_] = sum(w[k] * b for k, (a, b) in padded.items())
    return out


@pytest.mark.parametrize("rs", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("mode", ["norm", "data_size"])
def test_hetlora_matches_reference_over_rounds(mode: str, rs: bool) -> None:
    method = HetLoRA(RankPlan(RANKS, R, ALPHA, rs), HetLoRASettings(weights=mode))
    server = method.server_init(lora(R, seed=1))
    ref = lora_part(lora(R, seed=1))
    initials = {k: lora(RANKS[k], seed=10 + k) for k in range(len(RANKS))}
    local = {k: method.client_init(initials[k]) for k in initials}
    for t, sampled in enumerate(SCHEDULE):
        uploads, trained_by = [], {}
        for k in sampled:
            start = method.client_start(method.download(server, k), local[k], initials[k], k)
            assert_close(lora_part(start), hetlora_ref_download(ref, RANKS[k], rs), msg=lambda e: f"round {t} client {k} start: {e}")
            trained = perturb(method, start, 100 * t + k)
            upload, local[k] = method.client_finish(trained, start)
            uploads.append(ClientUpload(k, N[k], upload))
            trained_by[k] = lora_part(trained)
        server = method.aggregate(server, uploads)
        ref = hetlora_ref_aggregate(trained_by, mode, rs)
        assert_close(lora_part(server), ref, msg=lambda e: f"server after round {t}: {e}")


# -- FlexLoRA --------------------------------------------------------------------------------
@pytest.mark.parametrize("rs", [False, True], ids=["alpha/r", "rslora"])
def test_flexlora_matches_reference_over_rounds(rs: bool) -> None:
    method = FlexLoRA(RankPlan(RANKS, R, ALPHA, rs))
    initial_server = lora(R, seed=2)
    server = method.server_init(initial_server)
    initials = {k: lora(RANKS[k], seed=20 + k) for k in range(len(RANKS))}
    local = {k: method.client_init(initials[k]) for k in initials}
    # rounds 2 and 4 upload ranks summing to 6 < 8; the others to >= 8
    assert sum(RANKS[k] for k in SCHEDULE[1]) < R <= sum(RANKS[k] for k in SCHEDULE[0])
    w_g = None
    for t, sampled in enumerate(SCHEDULE):
        uploads, w_next = [], {m: 0.0 for m in MODULES}
        p = weights(sampled)
        for k in sampled:
            start = method.client_start(method.download(server, k), local[k], initials[k], k)
            trained = perturb(method, start, 100 * t + k)
            upload, local[k] = method.client_finish(trained, start)
            uploads.append(ClientUpload(k, N[k], upload))
            for m in MODULES:
                w_next[m] = w_next[m] + p[k] * product(trained, m, s(RANKS[k], rs))
        server = method.aggregate(server, uploads)
        w_g = w_next
        for k, r in enumerate(RANKS):  # every client's next download, sampled or not
            received = method.download(server, k)
            for m in MODULES:
                assert_close(product(received, m, s(r, rs)), truncated_svd(w_g[m], r), msg=lambda e: f"round {t} client {k} {m}: {e}")
        glob = method.global_state(server, initial_server)
        for m in MODULES:  # the full-rank reconstruction
            expected = w_g[m] if sum(RANKS[k] for k in sampled) <= R else truncated_svd(w_g[m], R)
            assert_close(product(glob, m, s(R, rs)), expected, msg=lambda e: f"round {t} global {m}: {e}")


# -- FLoRA -----------------------------------------------------------------------------------
def flora_round_increment(trained_by: dict, rs: bool, wire: torch.dtype | None) -> dict:
    """sum_k p_k s_k B_k A_k as the stack [s_k B_k] @ [p_k A_k] (wire: stack rounded first)."""
    p = weights(trained_by)
    out = {}
    for m in MODULES:
        a = torch.cat([p[k] * t[m + A_] for k, t in trained_by.items()], dim=0)
        b = torch.cat([s(RANKS[k], rs) * t[m + B_] for k, t in trained_by.items()], dim=1)
        if wire is not None:
            a, b = a.to(wire).to(F64), b.to(wire).to(F64)
        out[m] = b @ a
    return out


def run_flora(method, rs: bool, wire: torch.dtype | None) -> None:
    initial_server = lora(R, seed=3, b_zero=True, base=True)
    server = method.server_init(initial_server)
    w_ref = {m: initial_server[m + BASE].clone() for m in MODULES}
    initials = {k: lora(RANKS[k], seed=30 + k, base=True) for k in range(len(RANKS))}
    local = {k: method.client_init(initials[k]) for k in initials}
    holds = {k: 0 for k in initials}  # how many aggregations the client's W includes
    for t, sampled in enumerate(SCHEDULE):
        uploads, trained_by = [], {}
        for k in sampled:
            received = method.download(server, k)
            behind, holds[k] = t - holds[k], t
            has_stack = any(key.endswith((A_, B_)) for key in received)
            has_dense = any(key.endswith(BASE) for key in received)
            assert (has_stack, has_dense) == (behind == 1, behind > 1), f"round {t} client {k}, {behind} behind: got {sorted(received)}"
            if wire is not None:  # the stack is rounded on the wire; dense W travels in full precision
                received = {
                    key: v.to(wire).to(v.dtype) if v.is_floating_point() and not key.endswith(BASE) else v
                    for key, v in received.items()
                }
            start = method.client_start(received, local[k], initials[k], k)
            for m in MODULES:
                where = f"round {t} client {k} {m}"
                assert torch.equal(start[m + A_], initials[k][m + A_]) and torch.equal(start[m + B_], initials[k][m + B_]), where
                if wire is None:
                    assert_close(start[m + BASE], server[m + BASE], msg=lambda e: f"{where} W vs server: {e}")
                else:
                    assert torch.equal(start[m + BASE], server[m + BASE]), (
                        f"{where}: client W differs from server W by max "
                        f"{(start[m + BASE] - server[m + BASE]).abs().max().item():.3e}"
                    )
                assert_close(start[m + BASE], w_ref[m], msg=lambda e: f"{where} W vs reference: {e}")
            trained = perturb(method, start, 100 * t + k)
            upload, local[k] = method.client_finish(trained, start)
            uploads.append(ClientUpload(k, N[k], upload))
            trained_by[k] = lora_part(trained)
        server = method.aggregate(server, uploads)
        inc = flora_round_increment(trained_by, rs, wire)
        for m in MODULES:
            w_ref[m] = w_ref[m] + inc[m]
            assert_close(server[m + BASE], w_ref[m], msg=lambda e: f"server W after round {t} {m}: {e}")


@pytest.mark.parametrize("rs", [False, True], ids=["alpha/r", "rslora"])
def test_flora_clients_and_server_hold_the_reference_merged_weight(rs: bool) -> None:
    run_flora(FLoRA(RankPlan(RANKS, R, ALPHA, rs)), rs, wire=None)


def test_flora_bf16_wire_keeps_server_and_clients_bit_identical() -> None:
    if "wire_dtype" not in inspect.signature(FLoRA.__init__).parameters:
        pytest.fail("FLoRA.__init__ has no wire_dtype argument (yet): bf16 server/client agreement cannot be tested")
    run_flora(FLoRA(RankPlan(RANKS, R, ALPHA, False), wire_dtype=torch.bfloat16), False, wire=torch.bfloat16)


# -- HAFL ------------------------------------------------------------------------------------
def top(scores: torch.Tensor, budget: int) -> list[int]:
    """The ``budget`` highest scores, ties to the lower index, returned ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:budget])


class HAFLReference:
    """Server factors, global importance G and every client's full-rank importance EMAs."""

    def __init__(self, scheme: str, aggregation: str, ranks, n, rs: bool, server: dict) -> None:
        self.trunc, self.aggregation, self.ranks, self.n, self.rs = scheme == "truncation", aggregation, ranks, n, rs
        self.factors = {k: v.clone() for k, v in lora_part(server).items()}
        self.G = {m: torch.zeros(R, dtype=F64) for m in MODULES}
        self.ema: dict[int, dict[str, list[torch.Tensor]]] = {}

    def budget(self, k: int) -> int:
        return min(self.ranks[k], R)

    def full_ema(self, k: int) -> dict:
        if k not in self.ema:
            self.ema[k] = {key: [torch.zeros_like(v), torch.zeros_like(v)] for key, v in self.factors.items()}
        return self.ema[k]

    def scores(self, k: int, m: str) -> torch.Tensor:
        (ia, ua), (ib, ub) = self.full_ema(k)[m + A_], self.full_ema(k)[m + B_]
        return (ib * ub).mean(dim=0) + (ia * ua).mean(dim=1)

    def held(self, k: int) -> dict:
        return {m: top(self.G[m] if self.trunc else self.scores(k, m), self.budget(k)) for m in MODULES}

    def start(self, k: int, held: dict) -> dict:
        if not self.trunc:
            return {key: v.clone() for key, v in self.factors.items()}
        b, out = self.budget(k), {}
        for m in MODULES:
            out[m + A_] = self.factors[m + A_][held[m]].clone()
            out[m + B_] = self.factors[m + B_][:, held[m]] * s(R, self.rs) / s(b, self.rs)
        return out

    def train(self, k: int, held: dict, grads: list[dict], lr: float) -> tuple[dict, dict]:
        """Per-step EMAs and SGD (freezing: only the held components move); returns (trained, upload)."""
        params, full = self.start(k, held), self.full_ema(k)
        local = {}
        for key in params:
            m, dim = key[: -len(A_)], 0 if key.endswith(A_) else 1
            ib, ub = full[key]
            index = torch.tensor(held[m] if self.trunc else list(range(R)))
            local[key] = [ib.index_select(dim, index), ub.index_select(dim, index)]
        for g in grads:
            for key, w in params.items():
                ib, ub = local[key]
                sens = (w * g[key]).abs()
                ib = BETA * ib + (1 - BETA) * sens
                ub = BETA * ub + (1 - BETA) * (sens - ib).abs()
                local[key] = [ib, ub]
                step = g[key].clone()
                if not self.trunc:  # freezing: mask the components not held
                    m, mask = key[: -len(A_)], torch.zeros(R, dtype=F64)
                    mask[held[m]] = 1.0
                    step = step * (mask[:, None] if key.endswith(A_) else mask[None, :])
                params[key] = w - lr * step
        for key, (ib, ub) in local.items():  # scatter back at the held indices
            m = key[: -len(A_)]
            if not self.trunc:
                full[key] = [ib, ub]
                continue
            for j, i in enumerate(held[m]):
                for which, value in enumerate((ib, ub)):
                    if key.endswith(A_):
                        full[key][which][i] = value[j]
                    else:
                        full[key][which][:, i] = value[:, j]
        upload = {}
        for m in MODULES:
            idx = held[m]
            if self.trunc:
                upload[m + A_], upload[m + B_] = params[m + A_], params[m + B_]
                upload[m + SCORE] = self.scores(k, m)[idx]
            else:
                upload[m + A_], upload[m + B_] = params[m + A_][idx], params[m + B_][:, idx]
        return params, upload

    def aggregate(self, uploads: dict, held: dict) -> None:
        p = weights(uploads, self.n)
        for m in MODULES:
            a_old, b_old = self.factors[m + A_], self.factors[m + B_]
            a_new, b_new = a_old.clone(), b_old.clone()
            for i in range(R):
                holders = [k for k in uploads if i in held[k][m]]
                total = sum(p[k] for k in holders)
                if not holders:
                    if self.aggregation == "zero_padding":
                        a_new[i], b_new[:, i] = 0.0, 0.0
                    continue
                a_sum = sum(p[k] * uploads[k][m + A_][held[k][m].index(i)] for k in holders)
                b_sum = sum(
                    p[k] * uploads[k][m + B_][:, held[k][m].index(i)] * (s(self.budget(k), self.rs) / s(R, self.rs) if self.trunc else 1.0)
                    for k in holders
                )
                norm = total if self.aggregation == "adaptive" else 1.0
                a_new[i], b_new[:, i] = a_sum / norm, b_sum / norm
                if self.trunc:
                    self.G[m][i] = sum(p[k] * uploads[k][m + SCORE][held[k][m].index(i)] for k in holders) / total
            self.factors[m + A_], self.factors[m + B_] = a_new, b_new


def drive_hafl(method, start: dict, local: dict, grads: list[dict], lr: float) -> dict:
    """The engine's client_turn order: hooks around plain SGD steps, then extras."""
    hooks = method.local_hooks(start, local)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in lora_part(start).items() if method.trains(k)}
    for g in grads:
        for key, param in params.items():
            param.grad = g[key].clone()
        hooks.after_backward(params)
        with torch.no_grad():
            for param in params.values():
                param -= lr * param.grad
        hooks.after_step(params)
    trained = {k: v.clone() for k, v in start.items() if not k.startswith("_")}
    trained.update({k: p.detach().clone() for k, p in params.items()})
    trained.update({k: v for k, v in start.items() if k.startswith("_")})
    trained.update(hooks.extras())
    return trained


def hafl_grads(k: int, t: int, held: dict, trunc: bool, scale, steps: int = 3) -> list[dict]:
    """Seeded full-rank gradients times a per-component scale, gathered at the held components."""
    out = []
    for step in range(steps):
        g = {}
        for j, (m, (d_out, d_in)) in enumerate(MODULES.items()):
            seed = 1_000_000 + 10_000 * t + 100 * k + 10 * step + 2 * j
            ga, gb = randn((R, d_in), seed) * scale[:, None], randn((d_out, R), seed + 1) * scale[None, :]
            g[m + A_], g[m + B_] = (ga[held[m]], gb[:, held[m]]) if trunc else (ga, gb)
        out.append(g)
    return out


def run_hafl(scheme, aggregation, rs, ranks, n, schedule, scale_fn, lr_fn, b_zero=False):
    """Drive HAFL and the reference side by side, checking every observable; returns the held sets."""
    method = HAFL(RankPlan(tuple(ranks), R, ALPHA, rs), HAFLSettings(scheme=scheme, aggregation=aggregation))
    trunc = scheme == "truncation"
    initial_server = lora(R, seed=4, b_zero=b_zero)
    server = method.server_init(initial_server)
    ref = HAFLReference(scheme, aggregation, ranks, n, rs, initial_server)
    initials = {k: lora(min(r, R) if trunc else R, seed=40 + k, b_zero=b_zero) for k, r in enumerate(ranks)}
    local = {k: method.client_init(initials[k]) for k in initials}
    history = []
    for t, sampled in enumerate(schedule):
        uploads, ref_uploads, held_by = [], {}, {}
        for k in sampled:
            where = f"round {t} client {k}"
            held = held_by[k] = ref.held(k)
            grads, lr = hafl_grads(k, t, held, trunc, scale_fn(k, t)), lr_fn(k, t)
            received = method.download(server, k)
            if trunc:
                for m in MODULES:
                    assert received[m + INDEX].dtype == torch.int32, where
                    assert received[m + INDEX].tolist() == held[m], f"{where} {m}: sent {received[m + INDEX].tolist()}, reference {held[m]}"
            start = method.client_start(received, local[k], initials[k], k)
            assert_close(lora_part(start), ref.start(k, held), msg=lambda e: f"{where} start: {e}")
            trained = drive_hafl(method, start, local[k], grads, lr)
            upload, local[k] = method.client_finish(trained, start)
            ref_trained, ref_upload = ref.train(k, held, grads, lr)
            for m in MODULES:
                assert upload[m + INDEX].dtype == torch.int32, where
                assert upload[m + INDEX].tolist() == held[m], f"{where} {m}: uploaded {upload[m + INDEX].tolist()}, reference {held[m]}"
                if not trunc:  # frozen components bit-identical
                    frozen = [i for i in range(R) if i not in held[m]]
                    assert torch.equal(trained[m + A_][frozen], start[m + A_][frozen]), f"{where} {m} frozen A moved"
                    assert torch.equal(trained[m + B_][:, frozen], start[m + B_][:, frozen]), f"{where} {m} frozen B moved"
            got = {key: v for key, v in upload.items() if key.endswith((A_, B_, SCORE))}
            assert_close(got, ref_upload, msg=lambda e: f"{where} upload: {e}")
            uploads.append(ClientUpload(k, n[k], upload))
            ref_uploads[k] = ref_upload
        server = method.aggregate(server, uploads)
        ref.aggregate(ref_uploads, held_by)
        assert_close(lora_part(server), ref.factors, msg=lambda e: f"server after round {t}: {e}")
        history.append(held_by)
    return method, server, ref, history


ONES = lambda k, t: torch.ones(R, dtype=F64)  # noqa: E731
LR = lambda k, t: 0.05  # noqa: E731


@pytest.mark.parametrize("rs", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("aggregation", ["adaptive", "zero_padding"])
@pytest.mark.parametrize("scheme", ["freezing", "truncation"])
def test_hafl_matches_reference_over_rounds(scheme: str, aggregation: str, rs: bool) -> None:
    _, _, _, history = run_hafl(scheme, aggregation, rs, RANKS, N, SCHEDULE, ONES, LR)
    sets = {tuple(h[k]["layer.q"]) for h in history for k in h if RANKS[k] < R}
    assert len(sets) > 1, "the held components never changed: the test would not exercise selection"


def test_hafl_truncation_ema_follows_changing_held_sets() -> None:
    """The rank-2 client holds [0,1], [2,3], [1,3], [0,1]: its EMAs must follow the components."""
    ranks, schedule = (2, 4, 8), [[0, 1, 2], [0, 2], [0, 1, 2], [0, 2]]
    big = {0: [2, 3], 1: [1, 3], 2: [0, 1]}  # what the rank-8 client finds important in round t

    def scale(k, t):
        v = torch.full((R,), 0.05, dtype=F64)
        if k == 2 and t in big:
            v[big[t]] = 10.0 ** t
        return v

    lr = lambda k, t: 0.05 / 10.0**t if k == 2 else 0.05  # noqa: E731
    _, _, _, history = run_hafl("truncation", "adaptive", False, ranks, (20, 30, 60), schedule, scale, lr)
    assert [h[0]["layer.q"] for h in history] == [[0, 1], [2, 3], [1, 3], [0, 1]], "test design: held sets not as planned"


def test_hafl_truncation_sends_low_rank_clients_the_important_tail() -> None:
    ranks = (2, 2, 8)
    plan = RankPlan(ranks, R, ALPHA, False)
    method = HAFL(plan, HAFLSettings(scheme="truncation"))
    server = method.server_init(lora(R, seed=5))
    initials = {k: lora(min(r, R), seed=50 + k) for k, r in enumerate(ranks)}
    local = {k: method.client_init(initials[k]) for k in initials}
    tail = torch.zeros(R, dtype=F64)
    tail[[5, 6, 7]] = 1.0
    for t in range(3):
        uploads = []
        for k in range(3):
            received = method.download(server, k)
            held = {m: received[m + INDEX].tolist() for m in MODULES}
            if t == 2 and ranks[k] == 2:
                for m in MODULES:
                    assert set(held[m]) <= {5, 6, 7}, f"round {t}: rank-2 client {k} sent {held[m]} for {m}, not tail components"
            start = method.client_start(received, local[k], initials[k], k)
            trained = drive_hafl(method, start, local[k], hafl_grads(k, t, held, True, tail), 0.05)
            upload, local[k] = method.client_finish(trained, start)
            uploads.append(ClientUpload(k, (30, 50, 20)[k], upload))
        server = method.aggregate(server, uploads)


# One rank scale (a single uploader's round keeps its Delta W) is tested in test_rank_scale.py.
