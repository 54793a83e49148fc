"""Where task data comes from: a local data directory, a local file, or the Hugging Face Hub.

Every source is normalised to one of two row schemas, so partitioning and tokenisation
never look at where a dataset came from:

- classification: ``text`` (str), ``text_pair`` (str or None), ``label`` (int)
- generation: ``prompt`` (str), ``response`` (str), ``category`` (str), and for scored
  tasks ``choices`` (list of candidate responses) + ``answer`` (index), or ``final`` (the
  gold final answer of a math problem).

Named datasets are resolved in this order: the local data directory (config ``data_dir``
or env ``FEDTUNE_DATA_DIR``, laid out like ``shared/data``), then the Hub. A ``dataset``
value that is a path to a JSONL/JSON/CSV/Parquet file is read directly.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets

from fedtune.errors import UsageError

Kind = Literal["classification", "generation"]
Metric = Literal["accuracy", "exact_match", "multiple_choice", "perplexity"]

CLASSIFICATION_COLUMNS = ["text", "text_pair", "label"]
GENERATION_COLUMNS = ["prompt", "response", "category", "group", "choices", "answer", "final"]


@dataclass
class TaskData:
    """A task's train and test rows in the normalised schema, plus what to measure."""

    name: str
    kind: Kind
    metric: Metric
    train: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str] | None = None
    #: column that ``partition=natural`` groups by (one client per value)
    natural_key: str | None = None
    source: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names or [])


@dataclass(frozen=True)
class BuiltinDataset:
    description: str
    local: Callable[[Path], TaskData]
    hub: Callable[[], TaskData]
    #: files under the data directory whose presence selects the local source
    local_files: tuple[str, ...] = field(default_factory=tuple)


# -- normalisation helpers --------------------------------------------------------------------
def _classification(rows: list[dict[str, Any]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "text": [r["text"] for r in rows],
            "text_pair": [r.get("text_pair") for r in rows],
            "label": [int(r["label"]) for r in rows],
        },
        features=datasets.Features(
            {
                "text": datasets.Value("string"),
                "text_pair": datasets.Value("string"),
                "label": datasets.Value("int64"),
            }
        ),
    )


def _generation(rows: list[dict[str, Any]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in rows],
            "response": [r["response"] for r in rows],
            "category": [str(r.get("category") or "") for r in rows],
            "group": [str(r.get("group", r.get("category")) or "") for r in rows],
            "choices": [list(r.get("choices") or []) for r in rows],
            "answer": [int(r.get("answer", -1)) for r in rows],
            "final": [str(r.get("final") or "") for r in rows],
        },
        features=datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "response": datasets.Value("string"),
                "category": datasets.Value("string"),
                "group": datasets.Value("string"),
                "choices": datasets.Sequence(datasets.Value("string")),
                "answer": datasets.Value("int64"),
                "final": datasets.Value("string"),
            }
        ),
    )


def _read_json_or_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _read_tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


# -- 20 Newsgroups ----------------------------------------------------------------------------
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
    rows = _read_json_or_jsonl(root / "20newsgroups" / "20news-bydate.jsonl.gz")
    split = {"train": [], "test": []}
    for row in rows:
        split[row["split"]].append({"text": _strip_headers(row["text"]), "label": row["label"]})
    return TaskData(
        "20newsgroups", "classification", "accuracy",
        _classification(split["train"]), _classification(split["test"]),
        label_names=list(NEWSGROUPS), natural_key="label", source=str(root / "20newsgroups"),
    )  # fmt: skip


def _newsgroups_hub() -> TaskData:
    # SetFit/20_newsgroups: the bydate split with headers, footers and quotes already removed.
    ds = datasets.load_dataset("SetFit/20_newsgroups")
    parts = {s: _classification([{"text": r["text"], "label": r["label"]} for r in ds[s]]) for s in ("train", "test")}
    return TaskData(
        "20newsgroups", "classification", "accuracy", parts["train"], parts["test"],
        label_names=list(NEWSGROUPS), natural_key="label", source="hub:SetFit/20_newsgroups",
    )  # fmt: skip


# -- GLUE -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlueTask:
    folder: str
    hub_config: str
    label_names: tuple[str, ...]
    text_fields: tuple[str, ...]  # hub column names


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", "cola", ("unacceptable", "acceptable"), ("sentence",)),
    "sst2": GlueTask("SST-2", "sst2", ("negative", "positive"), ("sentence",)),
    "mrpc": GlueTask("MRPC", "mrpc", ("not_equivalent", "equivalent"), ("sentence1", "sentence2")),
    "rte": GlueTask("RTE", "rte", ("entailment", "not_entailment"), ("sentence1", "sentence2")),
    "qnli": GlueTask("QNLI", "qnli", ("entailment", "not_entailment"), ("question", "sentence")),
    "wnli": GlueTask("WNLI", "wnli", ("not_entailment", "entailment"), ("sentence1", "sentence2")),
}


def _glue_rows(task: str, path: Path) -> list[dict[str, Any]]:
    spec = GLUE_TASKS[task]
    if task == "cola":  # no header: source, label, original label, sentence
        return [{"text": r[3], "label": int(r[1])} for r in _read_tsv(path, header=False)]
    rows = _read_tsv(path, header=True)
    if task == "sst2":
        return [{"text": r[0], "label": int(r[1])} for r in rows]
    if task == "mrpc":  # Quality, #1 ID, #2 ID, #1 String, #2 String
        return [{"text": r[3], "text_pair": r[4], "label": int(r[0])} for r in rows]
    # rte, qnli, wnli: index, first, second, label (names for rte/qnli, 0/1 for wnli)
    names = list(spec.label_names)
    return [
        {"text": r[1], "text_pair": r[2], "label": int(r[3]) if r[3].isdigit() else names.index(r[3])}
        for r in rows
    ]


def _glue_local(task: str) -> Callable[[Path], TaskData]:
    def load(root: Path) -> TaskData:
        folder = root / "glue" / GLUE_TASKS[task].folder
        train_file = folder / "train.tsv"
        if not train_file.exists():
            raise UsageError(f"glue/{task}: {train_file} is missing (this copy has no training split)")
        return TaskData(
            f"glue/{task}", "classification", "accuracy",
            _classification(_glue_rows(task, train_file)), _classification(_glue_rows(task, folder / "dev.tsv")),
            label_names=list(GLUE_TASKS[task].label_names), natural_key="label", source=str(folder),
        )  # fmt: skip

    return load


def _glue_hub(task: str) -> Callable[[], TaskData]:
    def load() -> TaskData:
        spec = GLUE_TASKS[task]
        ds = datasets.load_dataset("nyu-mll/glue", spec.hub_config)

        def rows(split: str) -> list[dict[str, Any]]:
            out = []
            for r in ds[split]:
                pair = r[spec.text_fields[1]] if len(spec.text_fields) > 1 else None
                out.append({"text": r[spec.text_fields[0]], "text_pair": pair, "label": r["label"]})
            return out

        return TaskData(
            f"glue/{task}", "classification", "accuracy",
            _classification(rows("train")), _classification(rows("validation")),
            label_names=list(spec.label_names), natural_key="label", source=f"hub:nyu-mll/glue/{spec.hub_config}",
        )  # fmt: skip

    return load


# -- Dolly-15k --------------------------------------------------------------------------------
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
        train += [_dolly_row(r, client) for r in _read_json_or_jsonl(path)]
    test = [_dolly_row(r) for r in _read_json_or_jsonl(folder / "global_test.json")]
    # natural partition = the 10 pre-split clients (the FedIT/Shepherd split, 2-3 categories each)
    return TaskData(
        "dolly15k", "generation", "perplexity", _generation(train), _generation(test),
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
        "dolly15k", "generation", "perplexity", _generation(train), _generation(test),
        natural_key="category", source="hub:databricks/databricks-dolly-15k",
    )  # fmt: skip


# -- GSM8K ------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> str:
    """The final numeric answer of a solution: after '####' if present, else the last number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return ""
    value = numbers[-1 if "####" not in text else 0].replace(",", "").rstrip(".")
    try:
        as_float = float(value)
    except ValueError:
        return value
    return str(int(as_float)) if as_float.is_integer() else str(as_float)


def _gsm8k_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"prompt": r["question"], "response": r["answer"], "category": "math", "final": final_number(r["answer"])}
        for r in records
    ]


def _gsm8k_local(root: Path) -> TaskData:
    folder = root / "gsm8k"
    return TaskData(
        "gsm8k", "generation", "exact_match",
        _generation(_gsm8k_rows(_read_json_or_jsonl(folder / "train.jsonl"))),
        _generation(_gsm8k_rows(_read_json_or_jsonl(folder / "test.jsonl"))),
        natural_key="category", source=str(folder),
    )  # fmt: skip


def _gsm8k_hub() -> TaskData:
    ds = datasets.load_dataset("openai/gsm8k", "main")
    return TaskData(
        "gsm8k", "generation", "exact_match",
        _generation(_gsm8k_rows(list(ds["train"]))), _generation(_gsm8k_rows(list(ds["test"]))),
        natural_key="category", source="hub:openai/gsm8k",
    )  # fmt: skip


# -- multiple choice (LLM-Adapters prompt format) ---------------------------------------------
_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


def _mc_row(r: dict[str, Any], category: str) -> dict[str, Any]:
    options = _FORMAT.search(r["instruction"].strip())
    labels = options.group(1).split("/") if options else ["true", "false"]
    choices = [f"the correct answer is {label}" for label in labels]
    return {
        "prompt": r["instruction"],
        "response": f"the correct answer is {r['answer']}",
        "category": category,
        "choices": choices,
        "answer": labels.index(r["answer"]),
    }


@dataclass(frozen=True)
class MultipleChoiceTask:
    folder: str
    hub_id: str
    hub_config: str | None


MC_TASKS: dict[str, MultipleChoiceTask] = {
    "boolq": MultipleChoiceTask("boolq", "google/boolq", None),
    "arc-e": MultipleChoiceTask("ARC-Easy", "allenai/ai2_arc", "ARC-Easy"),
    "arc-c": MultipleChoiceTask("ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge"),
    "openbookqa": MultipleChoiceTask("openbookqa", "allenai/openbookqa", "main"),
}


def _mc_local(name: str) -> Callable[[Path], TaskData]:
    def load(root: Path) -> TaskData:
        folder = root / "llm_adapters" / "dataset" / MC_TASKS[name].folder
        train = [_mc_row(r, name) for r in _read_json_or_jsonl(folder / "train.json")]
        test = [_mc_row(r, name) for r in _read_json_or_jsonl(folder / "test.json")]
        return TaskData(
            name, "generation", "multiple_choice", _generation(train), _generation(test),
            natural_key="category", source=str(folder),
        )  # fmt: skip

    return load


def _mc_from_hub_record(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """Hub records rewritten into the LLM-Adapters instruction format used by the local files."""
    if name == "boolq":
        question = r["question"].rstrip("?")
        instruction = (
            f"Please answer the following question with true or false, question: {question}?"
            "\n\nAnswer format: true/false"
        )
        return _mc_row({"instruction": instruction, "answer": "true" if r["answer"] else "false"}, name)
    question = r["question"] if "question" in r else r["question_stem"]
    texts, keys = r["choices"]["text"], r["choices"]["label"]
    options = " ".join(f"Answer{i + 1}: {t}" for i, t in enumerate(texts))
    labels = "/".join(f"answer{i + 1}" for i in range(len(texts)))
    instruction = (
        f"Please choose the correct answer to the question: {question}\n\n{options}\n\nAnswer format: {labels}"
    )
    return _mc_row({"instruction": instruction, "answer": f"answer{keys.index(r['answerKey']) + 1}"}, name)


def _mc_hub(name: str) -> Callable[[], TaskData]:
    def load() -> TaskData:
        spec = MC_TASKS[name]
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config) if spec.hub_config else datasets.load_dataset(spec.hub_id)
        test_split = "test" if name != "boolq" else "validation"
        parts = {
            split: _generation([_mc_from_hub_record(name, r) for r in ds[split]]) for split in ("train", test_split)
        }
        return TaskData(
            name, "generation", "multiple_choice", parts["train"], parts[test_split],
            natural_key="category", source=f"hub:{spec.hub_id}",
        )  # fmt: skip

    return load


BUILTINS: dict[str, BuiltinDataset] = {
    "20newsgroups": BuiltinDataset(
        "20 Newsgroups (bydate, headers removed), 20-way topic classification",
        _newsgroups_local, _newsgroups_hub, ("20newsgroups/20news-bydate.jsonl.gz",),
    ),
    "dolly15k": BuiltinDataset(
        "databricks-dolly-15k instruction tuning; natural partition = the 10 Shepherd clients",
        _dolly_local, _dolly_hub, ("dolly15k/global_test.json",),
    ),
    "gsm8k": BuiltinDataset(
        "GSM8K grade-school math; exact match on the final number",
        _gsm8k_local, _gsm8k_hub, ("gsm8k/train.jsonl",),
    ),
    **{
        f"glue/{task}": BuiltinDataset(
            f"GLUE {spec.folder} classification ({'/'.join(spec.label_names)}); test = dev split",
            _glue_local(task), _glue_hub(task), (f"glue/{spec.folder}/dev.tsv",),
        )
        for task, spec in GLUE_TASKS.items()
    },
    **{
        name: BuiltinDataset(
            f"{spec.folder} multiple choice (LLM-Adapters format); accuracy by answer log-likelihood",
            _mc_local(name), _mc_hub(name), (f"llm_adapters/dataset/{spec.folder}/test.json",),
        )
        for name, spec in MC_TASKS.items()
    },
}  # fmt: skip


# -- local files and Hub ids ------------------------------------------------------------------
TEXT_FIELDS = ("text", "sentence", "content", "document", "sentence1", "question")
PAIR_FIELDS = ("text_pair", "sentence2", "hypothesis")
LABEL_FIELDS = ("label", "labels", "class", "target")
PROMPT_FIELDS = ("prompt", "instruction", "question", "input")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    if wanted:
        if wanted not in columns:
            raise UsageError(f"{what} column {wanted!r} not found; columns are {columns}")
        return wanted
    return next((c for c in candidates if c in columns), None)


@dataclass(frozen=True)
class FieldMap:
    """Column names of a user's own dataset (None: detected from common names)."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None
    prompt: str | None = None
    response: str | None = None


def normalise(ds: datasets.Dataset, name: str, fields: FieldMap, kind: str) -> tuple[datasets.Dataset, Kind, list[str] | None]:
    """Map an arbitrary table onto the classification or generation schema."""
    columns = list(ds.column_names)
    label = _pick(columns, fields.label, LABEL_FIELDS, "label")
    prompt = _pick(columns, fields.prompt, PROMPT_FIELDS, "prompt")
    response = _pick(columns, fields.response, RESPONSE_FIELDS, "response")
    if kind == "classification" or (kind == "auto" and label is not None and not fields.prompt):
        text = _pick(columns, fields.text, TEXT_FIELDS, "text")
        if text is None or label is None:
            raise UsageError(f"{name}: cannot find text and label columns in {columns}; set text_field= and label_field=")
        pair = _pick(columns, fields.text_pair, PAIR_FIELDS, "text pair")
        raw_labels = list(ds[label])
        if all(isinstance(v, int) for v in raw_labels):
            names = [str(i) for i in range(max(raw_labels) + 1)]
            ids = raw_labels
        else:
            names = sorted({str(v) for v in raw_labels})
            ids = [names.index(str(v)) for v in raw_labels]
        rows = [
            {"text": str(t), "text_pair": (str(p) if pair else None), "label": i}
            for t, p, i in zip(list(ds[text]), list(ds[pair]) if pair else [None] * len(ds), ids)
        ]
        return _classification(rows), "classification", names
    if prompt is None or response is None:
        raise UsageError(f"{name}: cannot find prompt and response columns in {columns}; set prompt_field= and response_field=")
    categories = list(ds["category"]) if "category" in columns else [""] * len(ds)
    rows = [
        {"prompt": str(p), "response": str(r), "category": str(c)}
        for p, r, c in zip(list(ds[prompt]), list(ds[response]), categories)
    ]
    return _generation(rows), "generation", None


def _split_off_test(ds: datasets.Dataset, test_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if len(ds) < 2:
        raise UsageError("a dataset needs at least 2 rows to split off a test set")
    parts = ds.train_test_split(test_size=test_fraction, seed=seed)
    return parts["train"], parts["test"]


FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".gz": "json"}


def _read_table(path: Path, role: str) -> datasets.Dataset:
    fmt = FILE_FORMATS.get(path.suffix)
    if fmt is None:
        raise UsageError(f"unsupported {role} file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


def _load_file(path: Path, fields: FieldMap, kind: str, seed: int, test_file: str | None) -> TaskData:
    test_path = Path(test_file) if test_file else None
    if test_path is not None and not test_path.is_file():
        raise UsageError(f"test dataset file not found: {test_file}")
    current = path
    try:  # datasets reads lazily: a malformed or non-UTF-8 file can fail in any of these steps
        train, task_kind, names = normalise(_read_table(path, "dataset"), path.name, fields, kind)
        if test_path is not None:
            current = test_path
            test, _, _ = normalise(_read_table(test_path, "test dataset"), test_path.name, fields, task_kind)
        else:
            train, test = _split_off_test(train, 0.1, seed)
    except UsageError:
        raise
    except UnicodeDecodeError:
        raise UsageError(f"cannot read dataset file {current}: it is not UTF-8 text") from None
    except Exception as err:  # the user's file is malformed: report it as input, in one line
        root = err
        while root.__cause__ is not None or root.__context__ is not None:  # datasets wraps the parser's error
            root = root.__cause__ or root.__context__  # type: ignore[assignment]
        raise UsageError(f"cannot read dataset file {current}: {type(root).__name__}: {root}".splitlines()[0][:300]) from None
    metric: Metric = "accuracy" if task_kind == "classification" else "perplexity"
    natural = "label" if task_kind == "classification" else "category"
    return TaskData(path.name, task_kind, metric, train, test, label_names=names, natural_key=natural, source=str(path))


def _load_hub(name: str, fields: FieldMap, kind: str, seed: int) -> TaskData:
    try:
        ds = datasets.load_dataset(name)
    except Exception as err:
        first = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UsageError(
            f"dataset {name!r} is not a built-in dataset, not a local file, and could not be loaded from the Hub ({first})"
        ) from None
    train_split = "train" if "train" in ds else next(iter(ds))
    test_split = next((s for s in ("test", "validation", "dev") if s in ds), None)
    train, task_kind, names = normalise(ds[train_split], name, fields, kind)
    if test_split:
        test, _, _ = normalise(ds[test_split], name, fields, task_kind)
    else:
        train, test = _split_off_test(train, 0.1, seed)
    metric: Metric = "accuracy" if task_kind == "classification" else "perplexity"
    natural = "label" if task_kind == "classification" else "category"
    return TaskData(name, task_kind, metric, train, test, label_names=names, natural_key=natural, source=f"hub:{name}")


def resolve_data_dir(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get("FEDTUNE_DATA_DIR")
    return Path(chosen).expanduser() if chosen else None


def combine_tasks(tasks: list[TaskData]) -> TaskData:
    """Several tasks as one federation's data, one ``task`` value per source: with
    ``partition=natural`` each client gets one task (a multi-task federation).

    Classification tasks must have the same number of labels (one head serves all); the
    label names are kept when they agree, else replaced by their indices.
    """
    kinds = {t.kind for t in tasks}
    if len(kinds) != 1:
        raise UsageError(f"cannot combine classification and generation datasets ({', '.join(t.name for t in tasks)})")
    metrics = {t.metric for t in tasks}
    if len(metrics) != 1:
        raise UsageError(f"combined datasets must share one metric, got {sorted(metrics)}")
    kind = kinds.pop()
    label_names = None
    if kind == "classification":
        sizes = {t.num_labels for t in tasks}
        if len(sizes) != 1:
            raise UsageError(f"combined classification datasets need equal label counts, got {sorted(sizes)}")
        names = [tuple(t.label_names or ()) for t in tasks]
        label_names = list(names[0]) if len(set(names)) == 1 else [str(i) for i in range(sizes.pop())]

    def tagged(split: str) -> datasets.Dataset:
        parts = [getattr(t, split).add_column("task", [t.name] * len(getattr(t, split))) for t in tasks]
        return datasets.concatenate_datasets(parts)

    return TaskData(
        "+".join(t.name for t in tasks), kind, metrics.pop(), tagged("train"), tagged("test"),
        label_names=label_names, natural_key="task", source=", ".join(t.source for t in tasks),
    )  # fmt: skip


def load_tasks(
    datasets_: str | list[str],
    data_dir: str | None = None,
    fields: FieldMap = FieldMap(),
    kind: str = "auto",
    seed: int = 0,
    test_dataset: str | None = None,
) -> TaskData:
    """One dataset, or several combined with a ``task`` column (see :func:`combine_tasks`)."""
    if isinstance(datasets_, str):
        return load_task(datasets_, data_dir, fields, kind, seed, test_dataset)
    if len(datasets_) == 1:
        return load_task(datasets_[0], data_dir, fields, kind, seed, test_dataset)
    return combine_tasks([load_task(name, data_dir, fields, kind, seed) for name in datasets_])


def load_task(
    dataset: str,
    data_dir: str | None = None,
    fields: FieldMap = FieldMap(),
    kind: str = "auto",
    seed: int = 0,
    test_dataset: str | None = None,
) -> TaskData:
    """Load ``dataset`` (a built-in name, a local file, or a Hub id) in the normalised schema."""
    if dataset in BUILTINS:
        spec = BUILTINS[dataset]
        root = resolve_data_dir(data_dir)
        if data_dir and (root is None or not root.is_dir()):
            raise UsageError(f"data_dir {data_dir} does not exist")
        if root is not None and all((root / f).exists() for f in spec.local_files):
            return spec.local(root)
        if data_dir:
            raise UsageError(f"{dataset}: {root} does not contain {', '.join(spec.local_files)}")
        try:
            return spec.hub()
        except UsageError:
            raise
        except Exception as err:
            first = f"{type(err).__name__}: {err}".splitlines()[0]
            raise UsageError(
                f"{dataset}: no local copy (set data_dir= or FEDTUNE_DATA_DIR) and the Hub is unreachable ({first})"
            ) from None
    if dataset.startswith("glue/"):
        raise UsageError(f"unsupported GLUE task {dataset!r}; supported: {', '.join('glue/' + t for t in GLUE_TASKS)}")
    path = Path(dataset).expanduser()
    if path.is_file():
        return _load_file(path, fields, kind, seed, test_dataset)
    if path.suffix in FILE_FORMATS or os.sep in dataset and not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        raise UsageError(f"dataset file not found: {dataset}")
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(
            f"unknown dataset {dataset!r}: not a built-in name ({', '.join(BUILTINS)}), not a local file, "
            "and Hub access is off (HF_HUB_OFFLINE=1)"
        )
    return _load_hub(dataset, fields, kind, seed)
