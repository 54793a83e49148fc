"""HAFL truncation: the server ranks components by importance, clients keep full-rank EMAs.

Local training is replaced by seeded gradients fed through the method's own hooks
(``helpers.train_with_hooks``), so what each client measures is known exactly.
"""

from __future__ import annotations

import torch
from helpers import train_with_hooks

from fedtune.methods import ClientUpload
from fedtune.methods.hafl import CHOSEN, HAFL, IBAR, IMPORTANCE, INDEX_SUFFIX, UBAR, HAFLSettings
from fedtune.resources import RankPlan

SHAPES = {"m0": (12, 10), "m1": (7, 9)}  # module -> (d_out, d_in)
BETA = 0.85


def initial_state(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (d_out, d_in) in SHAPES.items():
        state[f"{module}.lora_A"] = torch.randn(rank, d_in, generator=g)
        state[f"{module}.lora_B"] = torch.zeros(d_out, rank)
    return state


def tail_signal(tail: set[int], seed: int):
    """Gradients that are nonzero only on the components in ``tail`` (by server index)."""

    def grad_for(start: dict):
        def grad(key: str, param: torch.Tensor, step: int) -> torch.Tensor:
            module, factor = key.rsplit(".", 1)
            held = start[CHOSEN + module].tolist()
            g = torch.Generator().manual_seed(seed * 1000 + step * 10 + len(key))
            noise = torch.randn(param.shape, generator=g) + 1.0
            mask = torch.tensor([1.0 if i in tail else 0.0 for i in held])
            return noise * (mask[:, None] if factor == "lora_A" else mask[None, :])

        return grad

    return grad_for


def test_truncation_sends_low_rank_clients_the_important_tail_components() -> None:
    """Only components 5-7 carry signal. The rank-8 client holds (and reports) all of them,
    so the rank-2 clients must be sent tail components within a few rounds, not HetLoRA's
    prefix [0, 1] (what they got when the server ranked each client by its own scores)."""
    ranks = (2, 2, 8)
    method = HAFL(RankPlan(ranks, server_rank=8), HAFLSettings(scheme="truncation"))
    server = method.server_init(initial_state(8))
    local: dict[int, dict] = {k: {} for k in range(len(ranks))}
    sent: dict[int, list] = {0: [], 1: []}  # per low-rank client: the indices sent each round
    for round_num in range(3):
        uploads = []
        for client, n_k in zip(range(len(ranks)), (30, 50, 20)):
            received = method.download(server, client)
            if client in sent:
                sent[client].append({m: received[m + INDEX_SUFFIX].tolist() for m in SHAPES})
            start = method.client_start(received, local[client], initial_state(method.budget(client)), client)
            trained = train_with_hooks(method, start, local[client], tail_signal({5, 6, 7}, round_num * 10 + client)(start))
            upload, local[client] = method.client_finish(trained, start)
            uploads.append(ClientUpload(client, n_k, upload))
        server = method.aggregate(server, uploads)
    for client in (0, 1):
        assert sent[client][0] == {"m0": [0, 1], "m1": [0, 1]}  # round 1: nothing measured yet
        for later in sent[client][1:]:
            assert all(set(indices) <= {5, 6, 7} and len(indices) == 2 for indices in later.values()), later


def test_truncation_keeps_importance_emas_at_full_rank_per_step() -> None:
    """A rank-2 client of a rank-4 server holds [2, 3], then [1, 3], then [0, 1]. Its EMAs
    must follow a per-step full-rank reference: held components updated where they sit,
    the others untouched (no IndexError in round 2, no component inheriting another's EMA)."""
    r, budget = 4, 2
    method = HAFL(RankPlan((budget, r), server_rank=r), HAFLSettings(scheme="truncation"))
    server = method.server_init(initial_state(r))
    local: dict = {}
    reference = {
        f"{m}.lora_{f}": [torch.zeros(shape), torch.zeros(shape)]
        for m, (d_out, d_in) in SHAPES.items()
        for f, shape in (("A", (r, d_in)), ("B", (d_out, r)))
    }
    for round_num, held in enumerate(([2, 3], [1, 3], [0, 1])):
        for module in SHAPES:  # steer the server's ranking: these two components on top
            server[IMPORTANCE + module] = torch.tensor([1.0 if i in held else 0.0 for i in range(r)])
        received = method.download(server, 0)
        assert received["m0" + INDEX_SUFFIX].tolist() == held
        start = method.client_start(received, local, initial_state(budget), 0)
        steps: list[tuple[str, torch.Tensor, torch.Tensor]] = []

        def grad(key: str, param: torch.Tensor, step: int, round_num: int = round_num) -> torch.Tensor:
            g = torch.randn(param.shape, generator=torch.Generator().manual_seed(100 * round_num + 10 * step + len(key)))
            steps.append((key, param, g))
            return g

        trained = train_with_hooks(method, start, local, grad, steps=3)
        for key, weight, g in steps:  # the reference: AdaLoRA's EMA on the held components only
            dim = 0 if key.endswith("lora_A") else 1
            index = torch.tensor(held)
            ibar, ubar = reference[key]
            sensitivity = (weight * g).abs()
            new_i = BETA * ibar.index_select(dim, index) + (1 - BETA) * sensitivity
            new_u = BETA * ubar.index_select(dim, index) + (1 - BETA) * (sensitivity - new_i).abs()
            reference[key] = [ibar.index_copy(dim, index, new_i), ubar.index_copy(dim, index, new_u)]
        upload, local = method.client_finish(trained, start)
        for key, (ibar, ubar) in reference.items():
            torch.testing.assert_close(local[IBAR + key], ibar, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(local[UBAR + key], ubar, rtol=1e-6, atol=1e-9)
        for module in SHAPES:  # the reported scores are the reference's S_i at the held components
            s_a = reference[f"{module}.lora_A"][0] * reference[f"{module}.lora_A"][1]
            s_b = reference[f"{module}.lora_B"][0] * reference[f"{module}.lora_B"][1]
            expected = (s_b.mean(dim=0) + s_a.mean(dim=1))[held]
            torch.testing.assert_close(upload[module + ".hafl_score"], expected, rtol=1e-6, atol=1e-12)
        server = method.aggregate(server, [ClientUpload(0, 5, upload)])
    never_held_again = [2]  # held in round 1 only: its EMA is still round 1's, and nonzero
    assert float(local[IBAR + "m0.lora_A"][never_held_again].abs().sum()) > 0


def test_global_importance_is_the_p_weighted_mean_over_holders() -> None:
    r = 4
    method = HAFL(RankPlan((2, 4, 4), server_rank=r), HAFLSettings(scheme="truncation"))
    server = method.server_init(initial_state(r))
    server[IMPORTANCE + "m1"] = torch.tensor([0.0, 0.0, 0.0, 7.0])  # measured in an earlier round

    def upload(indices: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
        out = {}
        for module, (d_out, d_in) in SHAPES.items():
            out[f"{module}.lora_A"] = torch.ones(len(indices), d_in)
            out[f"{module}.lora_B"] = torch.ones(d_out, len(indices))
            out[module + INDEX_SUFFIX] = torch.tensor(indices, dtype=torch.int32)
            out[module + ".hafl_score"] = torch.tensor(scores)
        return out

    uploads = [ClientUpload(0, 10, upload([0, 2], [1.0, 2.0])), ClientUpload(1, 30, upload([0, 1, 2], [3.0, 4.0, 6.0]))]
    new = method.aggregate(server, uploads)
    # p = (0.25, 0.75); component 0: 0.25*1 + 0.75*3; 1: only client 1; 2: 0.25*2 + 0.75*6; 3: nobody, kept
    torch.testing.assert_close(new[IMPORTANCE + "m0"], torch.tensor([2.5, 4.0, 5.0, 0.0]))
    torch.testing.assert_close(new[IMPORTANCE + "m1"], torch.tensor([2.5, 4.0, 5.0, 7.0]))
