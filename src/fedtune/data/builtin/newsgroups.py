"""20 Newsgroups "bydate": 20-way topic classification (local copy, or SetFit/20_newsgroups on the Hub)."""

from __future__ import annotations

from pathlib import Path

import datasets

from fedtune.data.sources import BuiltinDataset, TaskData, classification_rows, read_json_or_jsonl, register

NEWSGROUPS = [
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med",
    "sci.space", "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast",
    "talk.politics.misc", "talk.religion.misc",
]  # fmt: skip


def _strip_headers(text: str) -> str:
    # A message's headers end at its first blank line (the sklearn "headers" removal).
    _, sep, body = text.partition("\n\n")
    return body if sep else text


def _newsgroups_local(root: Path) -> TaskData:
    rows = read_json_or_jsonl(root / "20newsgroups" / "20news-bydate.jsonl.gz")
    split = {"train": [], "test": []}
    for row in rows:
        split[row["split"]].append({"text": _strip_headers(row["text"]), "label": row["label"]})
    return TaskData(
        "20newsgroups", "classification", "accuracy",
        classification_rows(split["train"]), classification_rows(split["test"]),
        label_names=list(NEWSGROUPS), natural_key="label", source=str(root / "20newsgroups"),
    )  # fmt: skip


def _newsgroups_hub() -> TaskData:
    # SetFit/20_newsgroups: the bydate split with headers, footers and quotes already removed.
    ds = datasets.load_dataset("SetFit/20_newsgroups")
    parts = {s: classification_rows([{"text": r["text"], "label": r["label"]} for r in ds[s]]) for s in ("train", "test")}
    return TaskData(
        "20newsgroups", "classification", "accuracy", parts["train"], parts["test"],
        label_names=list(NEWSGROUPS), natural_key="label", source="hub:SetFit/20_newsgroups",
    )  # fmt: skip


register(
    "20newsgroups",
    BuiltinDataset(
        "20 Newsgroups (bydate, headers removed), 20-way topic classification",
        _newsgroups_local, _newsgroups_hub, ("20newsgroups/20news-bydate.jsonl.gz",),
    ),
)  # fmt: skip
