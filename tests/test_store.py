"""The client state store keeps states in memory up to a budget and spills the rest to disk."""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.runtime.store import ClientStateStore


def state(seed: int) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((4, 8), float(seed)), "m.lora_B": torch.full((8, 4), -float(seed))}


def test_spills_beyond_budget_and_reads_back(tmp_path: Path) -> None:
    one = 2 * 32 * 4  # bytes of one state
    store = ClientStateStore(budget_bytes=3 * one, spill_dir=tmp_path)
    for client in range(10):
        store.put(client, state(client))
    assert store.memory_bytes <= 3 * one
    assert len(store) == 10
    assert store.spilled == frozenset(range(7))
    assert len(list(tmp_path.glob("*.safetensors"))) == 7
    for client in range(10):
        got = store.get(client)
        assert got is not None and torch.equal(got["m.lora_A"], state(client)["m.lora_A"])
    assert store.memory_bytes <= 3 * one
    assert store.get(99) is None


def test_zero_budget_keeps_everything_on_disk(tmp_path: Path) -> None:
    store = ClientStateStore(budget_bytes=0, spill_dir=tmp_path)
    store.put(1, state(1))
    store.put(2, state(2))
    assert 1 in store.spilled
    assert torch.equal(store.get(1)["m.lora_B"], state(1)["m.lora_B"])


def test_put_replaces_and_items_lists_all(tmp_path: Path) -> None:
    store = ClientStateStore(budget_bytes=300, spill_dir=tmp_path)
    for client in range(3):
        store.put(client, state(client))
    store.put(0, state(7))
    items = dict(store.items())
    assert sorted(items) == [0, 1, 2]
    assert torch.equal(items[0]["m.lora_A"], state(7)["m.lora_A"])
    store.put(5, {})
    assert store.get(5) == {}
