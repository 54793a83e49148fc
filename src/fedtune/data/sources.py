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
import operator
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

    @property
    def modality(self) -> str:
        """``image`` for image classification rows (an ``image`` column), else ``text``."""
        return "image" if "image" in self.train.column_names else "text"


@dataclass(frozen=True)
class BuiltinDataset:
    description: str
    local: Callable[[Path], TaskData]
    hub: Callable[[], TaskData]
    #: files under the data directory whose presence selects the local source
    local_files: tuple[str, ...] = field(default_factory=tuple)


#: every built-in dataset by name; each family module in ``fedtune.data.builtin`` adds its own
BUILTINS: dict[str, BuiltinDataset] = {}


def register(name: str, dataset: BuiltinDataset) -> None:
    if name in BUILTINS:
        raise ValueError(f"built-in dataset {name!r} registered twice")
    BUILTINS[name] = dataset


# -- normalisation helpers --------------------------------------------------------------------
def classification_rows(rows: list[dict[str, Any]]) -> datasets.Dataset:
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


def generation_rows(rows: list[dict[str, Any]]) -> datasets.Dataset:
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


def read_json_or_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_tsv(path: Path, header: bool) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


# -- local files and Hub ids ------------------------------------------------------------------
TEXT_FIELDS = ("text", "sentence", "content", "document", "sentence1", "question")
PAIR_FIELDS = ("text_pair", "sentence2", "hypothesis")
LABEL_FIELDS = ("label", "labels", "class", "target")
PROMPT_FIELDS = ("prompt", "instruction", "question", "input")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")
IMAGE_FIELDS = ("image", "img", "picture", "photo")


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
    image: str | None = None


def image_rows(images: list[Any], labels: list[int]) -> datasets.Dataset:
    """The image classification schema: ``image`` (decoded as PIL images), ``label``."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": [int(v) for v in labels]}, features=features)


def _label_ids(ds: datasets.Dataset, label: str) -> tuple[list[int], list[str]]:
    feature = ds.features.get(label)
    raw = list(ds[label])
    if isinstance(feature, datasets.ClassLabel):
        return [int(v) for v in raw], list(feature.names)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        return raw, [str(i) for i in range(max(raw) + 1)]
    names = sorted({str(v) for v in raw})
    return [names.index(str(v)) for v in raw], names


def _image_column(ds: datasets.Dataset, wanted: str | None) -> str | None:
    columns = list(ds.column_names)
    if wanted:
        return _pick(columns, wanted, (), "image")
    typed = [c for c in columns if isinstance(ds.features.get(c), datasets.Image)]
    return typed[0] if typed else next((c for c in IMAGE_FIELDS if c in columns), None)


def normalise(ds: datasets.Dataset, name: str, fields: FieldMap, kind: str, folder: Path | None = None) -> tuple[datasets.Dataset, Kind, list[str] | None]:
    """Map an arbitrary table onto the classification, image or generation schema. Image
    columns holding file paths are read relative to ``folder`` (the data file's)."""
    columns = list(ds.column_names)
    label = _pick(columns, fields.label, LABEL_FIELDS, "label")
    image = _image_column(ds, fields.image)
    if image is not None and kind != "generation":
        if label is None:
            raise UsageError(f"{name}: an image column {image!r} but no label column in {columns}; set label_field=")
        images = ds[image]
        if not isinstance(ds.features.get(image), datasets.Image):  # paths (or bytes) in a JSON/CSV file
            images = [str((folder or Path()) / p) if isinstance(p, str) and not Path(p).is_absolute() else p for p in images]
        ids, names = _label_ids(ds, label)
        return image_rows(list(images), ids), "classification", names
    prompt = _pick(columns, fields.prompt, PROMPT_FIELDS, "prompt")
    response = _pick(columns, fields.response, RESPONSE_FIELDS, "response")
    if kind == "classification" or (kind == "auto" and label is not None and not fields.prompt):
        text = _pick(columns, fields.text, TEXT_FIELDS, "text")
        if text is None or label is None:
            raise UsageError(f"{name}: cannot find text and label columns in {columns}; set text_field= and label_field=")
        pair = _pick(columns, fields.text_pair, PAIR_FIELDS, "text pair")
        ids, names = _label_ids(ds, label)
        rows = [
            {"text": str(t), "text_pair": (str(p) if pair else None), "label": i}
            for t, p, i in zip(list(ds[text]), list(ds[pair]) if pair else [None] * len(ds), ids)
        ]
        return classification_rows(rows), "classification", names
    # multiple choice: every row a list of candidate answers and the gold one (its index or text)
    candidates = list(ds["choices"]) if "choices" in columns and "answer" in columns else []
    choice_rows = bool(candidates) and all(isinstance(c, (list, tuple)) and len(c) >= 2 for c in candidates)
    if choice_rows and response in (None, "answer"):  # the answer column is the gold index: train on its text
        response = None
    elif prompt is None or response is None:
        raise UsageError(f"{name}: cannot find prompt and response columns in {columns}; set prompt_field= and response_field=")
    if prompt is None:
        raise UsageError(f"{name}: cannot find a prompt column in {columns}; set prompt_field=")
    categories = list(ds["category"]) if "category" in columns else [""] * len(ds)
    responses = list(ds[response]) if response is not None else [""] * len(ds)
    rows = [{"prompt": str(p), "response": str(r), "category": str(c)} for p, r, c in zip(list(ds[prompt]), responses, categories)]
    if choice_rows:
        for n, (row, choices, answer) in enumerate(zip(rows, candidates, list(ds["answer"]))):
            row["choices"] = [str(c) for c in choices]
            row["answer"] = _answer_index(name, n, row["choices"], answer)
            if response is None:
                row["response"] = row["choices"][row["answer"]]
    return generation_rows(rows), "generation", None


def _answer_index(name: str, n: int, choices: list[str], answer: Any) -> int:
    """The gold candidate's index, from an index (any integer type, an integral float, a digit
    string) or from the candidate's own text."""
    index: int | None = None
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        index = int(answer.strip()) if answer.strip().isdigit() else None
    elif isinstance(answer, float):  # a Parquet / pandas integer column with a missing value somewhere
        index = int(answer) if answer.is_integer() else None
    else:
        try:
            index = operator.index(answer)  # int, numpy integers
        except TypeError:
            index = None
    if index is not None and 0 <= index < len(choices):
        return index
    raise UsageError(f"{name}: row {n + 1}: 'answer' must be the index or the text of one of its {len(choices)} choices, got {answer!r}"[:300])


def _split_off_test(ds: datasets.Dataset, test_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    if len(ds) < 2:
        raise UsageError("a dataset needs at least 2 rows to split off a test set")
    parts = ds.train_test_split(test_size=test_fraction, seed=seed)
    return parts["train"], parts["test"]


FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".gz": "json"}


def _read_table(path: Path, role: str) -> datasets.Dataset:
    if path.is_dir():  # an image folder: one sub-folder per class (datasets' imagefolder)
        return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    fmt = FILE_FORMATS.get(path.suffix)
    if fmt is None:
        raise UsageError(f"unsupported {role} file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


def _load_file(path: Path, fields: FieldMap, kind: str, seed: int, test_file: str | None) -> TaskData:
    test_path = Path(test_file) if test_file else None
    if test_path is not None and not test_path.exists():
        raise UsageError(f"test dataset file not found: {test_file}")
    current = path
    try:  # datasets reads lazily: a malformed or non-UTF-8 file can fail in any of these steps
        train, task_kind, names = normalise(_read_table(path, "dataset"), path.name, fields, kind, path.parent)
        if test_path is not None:
            current = test_path
            test, _, _ = normalise(_read_table(test_path, "test dataset"), test_path.name, fields, task_kind, test_path.parent)
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
    natural = "label" if task_kind == "classification" else "category"
    return TaskData(path.name, task_kind, _metric_of(task_kind, test), train, test, label_names=names, natural_key=natural, source=str(path))


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
    natural = "label" if task_kind == "classification" else "category"
    return TaskData(name, task_kind, _metric_of(task_kind, test), train, test, label_names=names, natural_key=natural, source=f"hub:{name}")


def _metric_of(task_kind: str, test: datasets.Dataset) -> Metric:
    """A user's generation rows that all carry candidate answers (``choices`` + ``answer``) are
    scored as multiple choice, like the built-in commonsense tasks; other generation rows by loss."""
    if task_kind == "classification":
        return "accuracy"
    # ``normalise`` gives every row checked candidates and a gold index, or none at all
    scored = len(test) > 0 and all(test["choices"])
    return "multiple_choice" if scored else "perplexity"


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
            files = ", ".join(spec.local_files)
            if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
                why = "Hub access is off (HF_HUB_OFFLINE=1); unset it to download"
            else:
                why = f"the Hub is unreachable ({f'{type(err).__name__}: {err}'.splitlines()[0][:160]})"
            raise UsageError(f"{dataset}: no local copy (set data_dir= or FEDTUNE_DATA_DIR to a folder with {files}) and {why}") from None
    if dataset.startswith("glue/"):
        glue = sorted(name for name in BUILTINS if name.startswith("glue/"))
        raise UsageError(f"unsupported GLUE task {dataset!r}; supported: {', '.join(glue)}")
    path = Path(dataset).expanduser()
    if path.is_file() or path.is_dir():  # a data file, or a folder of images by class
        return _load_file(path, fields, kind, seed, test_dataset)
    if path.suffix in FILE_FORMATS or os.sep in dataset and not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        raise UsageError(f"dataset file not found: {dataset}")
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(
            f"unknown dataset {dataset!r}: not a built-in name ({', '.join(BUILTINS)}), not a local file, "
            "and Hub access is off (HF_HUB_OFFLINE=1)"
        )
    return _load_hub(dataset, fields, kind, seed)
