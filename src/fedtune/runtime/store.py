"""Per-client state between turns: in memory up to a byte budget, spilled to disk beyond it.

A federation of 1,000 clients with personal LoRA parts must fit on one machine. The store
keeps the most recently used clients' tensors in RAM and writes the least recently used
to ``<spill_dir>/<client>.safetensors`` once the budget is exceeded; ``get`` reads a
spilled client back transparently. No pickles: safetensors only.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedtune.atomic import save_safetensors
from fedtune.errors import UsageError
from fedtune.state import State, num_bytes


class ClientStateStore:
    def __init__(self, budget_bytes: int, spill_dir: Path) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.spill_dir = Path(spill_dir)
        self._memory: OrderedDict[int, State] = OrderedDict()
        self._memory_bytes = 0
        self._spilled: set[int] = set()

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._memory or client_id in self._spilled

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    @property
    def spilled(self) -> frozenset[int]:
        return frozenset(self._spilled)

    def _path(self, client_id: int) -> Path:
        return self.spill_dir / f"{client_id}.safetensors"

    def put(self, client_id: int, state: State) -> None:
        self._drop(client_id)
        stored = {k: v.detach().contiguous() for k, v in state.items()}
        self._memory[client_id] = stored
        self._memory_bytes += num_bytes(stored)
        self._evict()

    def get(self, client_id: int) -> State | None:
        if client_id in self._memory:
            self._memory.move_to_end(client_id)
            return self._memory[client_id]
        if client_id in self._spilled:
            state = load_file(self._path(client_id))
            self._spilled.discard(client_id)
            self._path(client_id).unlink()
            self._memory[client_id] = state
            self._memory_bytes += num_bytes(state)
            self._evict(keep=client_id)
            return state
        return None

    def items(self) -> list[tuple[int, State]]:
        """Every client's state (spilled ones read back), in client order."""
        ids = sorted(set(self._memory) | self._spilled)
        return [(i, state) for i in ids if (state := self.get(i)) is not None]

    def _drop(self, client_id: int) -> None:
        if client_id in self._memory:
            self._memory_bytes -= num_bytes(self._memory.pop(client_id))
        if client_id in self._spilled:
            self._spilled.discard(client_id)
            self._path(client_id).unlink(missing_ok=True)

    def _evict(self, keep: int | None = None) -> None:
        while self._memory_bytes > self.budget_bytes and self._memory:
            victim = next(iter(self._memory))
            if victim == keep:
                if len(self._memory) == 1:
                    return
                self._memory.move_to_end(victim)
                continue
            state = self._memory.pop(victim)
            self._memory_bytes -= num_bytes(state)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            save_file(state, str(self._path(victim)))
            self._spilled.add(victim)


class ClientCheckpoint:
    """Every client's local state as of the last checkpointed round, for resuming a run.

    A client's state after round t goes to ``<dir>/<client>-r<t>.safetensors`` as soon as
    its turn ends. Which file is current is decided by a manifest {client: round} that the
    caller commits together with the server's checkpoint (one atomic rename); files newer
    than the committed manifest (a run killed mid-round) are ignored and later pruned, so a
    resumed run restarts the round from exactly the states the server's checkpoint saw.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest: dict[int, int] = {}

    def _path(self, client_id: int, round_num: int) -> Path:
        return self.directory / f"{client_id}-r{round_num}.safetensors"

    def write(self, client_id: int, round_num: int, state: State) -> None:
        save_safetensors(self._path(client_id, round_num), state)
        self.manifest[client_id] = round_num

    def encode(self) -> str:
        return json.dumps({str(k): v for k, v in sorted(self.manifest.items())})

    def committed(self) -> None:
        """The manifest is committed: files it does not name are no longer needed."""
        wanted = {self._path(c, r).name for c, r in self.manifest.items()}
        for path in self.directory.glob("*.safetensors") if self.directory.is_dir() else []:
            if path.name not in wanted:
                path.unlink(missing_ok=True)

    def restore(self, encoded: str) -> dict[int, State]:
        """The states a committed manifest names."""
        self.manifest = {int(k): int(v) for k, v in json.loads(encoded or "{}").items()}
        states = {}
        for client_id, round_num in self.manifest.items():
            path = self._path(client_id, round_num)
            try:
                states[client_id] = load_file(str(path))
            except Exception as err:
                raise UsageError(f"checkpoint of client {client_id} ({path}) is missing or unreadable ({type(err).__name__})") from None
        return states
