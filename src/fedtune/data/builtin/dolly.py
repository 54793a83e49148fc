"""databricks-dolly-15k instruction tuning; the natural partition is the 10 Shepherd clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from fedtune.data.sources import BuiltinDataset, TaskData, generation_rows, read_json_or_jsonl, register


def _dolly_prompt(instruction: str, context: str) -> str:
    return f"{instruction}\n\nContext:\n{context}" if context.strip() else instruction


def _dolly_row(r: dict[str, Any], client: int | None = None) -> dict[str, Any]:
    return {
        "prompt": _dolly_prompt(r["instruction"], r.get("context") or ""),
        "response": r["response"],
        "category": r["category"],
        # the natural partition key: the pre-split client file, or the category on the Hub copy
        "group": str(client) if client is not None else r["category"],
    }


def _dolly_local(root: Path) -> TaskData:
    folder = root / "dolly15k"
    files = sorted(folder.glob("local_training_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    train = []
    for path in files:
        client = int(path.stem.rsplit("_", 1)[1])
        train += [_dolly_row(r, client) for r in read_json_or_jsonl(path)]
    test = [_dolly_row(r) for r in read_json_or_jsonl(folder / "global_test.json")]
    # natural partition = the 10 pre-split clients (the FedIT/Shepherd split, 2-3 categories each)
    return TaskData(
        "dolly15k", "generation", "perplexity", generation_rows(train), generation_rows(test),
        natural_key="group", source=str(folder),
    )  # fmt: skip


def _dolly_hub() -> TaskData:
    ds = datasets.load_dataset("databricks/databricks-dolly-15k")["train"]
    rows = [_dolly_row(r) for r in ds]
    # Hold out 10 rows per category as the global test set, as the Shepherd split does.
    seen: dict[str, int] = {}
    train, test = [], []
    for row in rows:
        if seen.get(row["category"], 0) < 10:
            seen[row["category"]] = seen.get(row["category"], 0) + 1
            test.append(row)
        else:
            train.append(row)
    return TaskData(
        "dolly15k", "generation", "perplexity", generation_rows(train), generation_rows(test),
        natural_key="category", source="hub:databricks/databricks-dolly-15k",
    )  # fmt: skip


register(
    "dolly15k",
    BuiltinDataset(
        "databricks-dolly-15k instruction tuning; natural partition = the 10 Shepherd clients",
        _dolly_local, _dolly_hub, ("dolly15k/global_test.json",),
    ),
)  # fmt: skip
