"""Data sources, partitioners and tokenisation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest
from conftest import requires_shared_data, shared_data_dir

from fedtune.data.builtin.gsm8k import final_number
from fedtune.data.encode import IGNORE_INDEX, collate, encode_generation, encode_scored
from fedtune.data.partition import partition
from fedtune.data.sources import FieldMap, load_task
from fedtune.errors import UsageError
from fedtune.models.loading import load_model


@requires_shared_data
@pytest.mark.parametrize(
    ("name", "kind", "metric", "train_rows", "test_rows", "labels"),
    [
        ("20newsgroups", "classification", "accuracy", 11314, 7532, 20),
        ("glue/sst2", "classification", "accuracy", 67349, 872, 2),
        ("glue/mrpc", "classification", "accuracy", 3667, 408, 2),
        ("glue/rte", "classification", "accuracy", 2490, 277, 2),
        ("glue/cola", "classification", "accuracy", 8551, 1043, 2),
        ("dolly15k", "generation", "perplexity", 14931, 80, 0),
        ("gsm8k", "generation", "exact_match", 7473, 1319, 0),
        ("boolq", "generation", "multiple_choice", 9427, 3270, 0),
        ("arc-e", "generation", "multiple_choice", 2251, 2376, 0),
        ("arc-c", "generation", "multiple_choice", 1119, 1172, 0),
        ("openbookqa", "generation", "multiple_choice", 4957, 500, 0),
    ],
)
def test_builtin_local_datasets(name, kind, metric, train_rows, test_rows, labels) -> None:
    task = load_task(name, str(shared_data_dir()))
    assert (task.kind, task.metric) == (kind, metric)
    assert (len(task.train), len(task.test)) == (train_rows, test_rows)
    assert task.num_labels == labels


@requires_shared_data
def test_newsgroups_headers_removed_and_labels_balanced() -> None:
    task = load_task("20newsgroups", str(shared_data_dir()))
    assert not any(t.startswith("From:") for t in task.train["text"][:200])
    counts = Counter(task.train["label"])
    assert counts[0] == 480 and counts[19] == 377


@requires_shared_data
def test_dolly_natural_partition_is_the_ten_client_files() -> None:
    task = load_task("dolly15k", str(shared_data_dir()))
    shards = partition(task.train, "natural", 10, task.natural_key)
    assert sorted(len(s) for s in shards) == [1492] + [1493] * 7 + [1494] * 2
    assert sum(len(s) for s in shards) == len(task.train)
    assert all(len(set(s[task.natural_key])) == 1 for s in shards)


@requires_shared_data
def test_multiple_choice_rows_have_choices_and_answers() -> None:
    task = load_task("arc-e", str(shared_data_dir()))
    row = task.test[0]
    assert row["choices"][row["answer"]] == row["response"]
    assert len(row["choices"]) >= 4


@requires_shared_data
@pytest.mark.parametrize(("name", "folder"), [("arc-e", "ARC-Easy"), ("openbookqa", "openbookqa"), ("piqa", "piqa")])
def test_answer_text_form_scores_each_options_own_text(name: str, folder: str) -> None:
    """``<task>-text``: the question alone as the prompt, each option's text as a candidate. The
    expected texts are cut out of the raw LLM-Adapters rows here with plain string splits."""
    raw = json.loads((shared_data_dir() / "llm_adapters" / "dataset" / folder / "test.json").read_text())
    labelled, texts = load_task(name, str(shared_data_dir())), load_task(f"{name}-text", str(shared_data_dir()))
    assert texts.metric == "multiple_choice" and len(texts.test) == len(labelled.test) == len(raw)
    word = "Solution" if name == "piqa" else "Answer"
    for n in range(0, len(raw), 97):
        question, block = raw[n]["instruction"].split("\n\n")[0], raw[n]["instruction"].split("\n\nAnswer format:")[0]
        count = len(labelled.test[n]["choices"])
        expected = []
        for k in range(1, count + 1):
            after = block.split(f"{word}{k}: ", 1)[1]
            expected.append(after.split(f"{word}{k + 1}: ", 1)[0].strip() if k < count else after.strip())
        row = texts.test[n]
        assert row["choices"] == expected and row["answer"] == labelled.test[n]["answer"]
        assert row["response"] == expected[row["answer"]]
        assert row["prompt"] == "Answer the question.\nQuestion: " + question.split("to the question: ", 1)[1]
        assert all(f"{word}1" not in c for c in row["choices"])


def test_answer_text_form_refuses_a_row_whose_options_it_cannot_read(tmp_path: Path) -> None:
    folder = tmp_path / "llm_adapters" / "dataset" / "ARC-Easy"
    folder.mkdir(parents=True)
    good = {"instruction": "Please choose the correct answer to the question: 2+2?\n\nAnswer1: 4 Answer2: 5\n\nAnswer format: answer1/answer2", "answer": "answer1"}
    bad = {"instruction": "Please choose: 2+2? 4 or 5", "answer": "answer1"}
    (folder / "test.json").write_text(json.dumps([good, bad]))
    with pytest.raises(UsageError, match=r"arc-e-text: row 2: the options could not be read"):
        load_task("arc-e-text", str(tmp_path))
    (folder / "test.json").write_text(json.dumps([good]))
    assert load_task("arc-e-text", str(tmp_path)).test[0]["choices"] == ["4", "5"]


def test_final_number_extraction() -> None:
    assert final_number("so 3 + 4 = 7\n#### 7") == "7"
    assert final_number("#### 1,234") == "1234"
    assert final_number("The answer is 12.50.") == "12.5"
    assert final_number("no digits") == ""


def _labelled(n: int, labels: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(n)], "label": [i % labels for i in range(n)]})


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "natural"])
def test_partitions_cover_the_data_without_overlap(scheme: str) -> None:
    ds = _labelled(200, 5)
    clients = 5
    shards = partition(ds, scheme, clients, "label", seed=1, alpha=0.5, classes_per_client=2)
    assert len(shards) == clients
    texts = [t for s in shards for t in s["text"]]
    assert len(texts) == len(set(texts))
    if scheme != "pathological":
        assert len(texts) == 200
    if scheme == "pathological":
        assert all(len(set(s["label"])) <= 2 for s in shards)


def test_dirichlet_is_non_iid_and_seeded() -> None:
    ds = _labelled(1000, 10)
    a = partition(ds, "dirichlet", 5, "label", seed=0, alpha=0.1)
    b = partition(ds, "dirichlet", 5, "label", seed=0, alpha=0.1)
    assert [s["text"] for s in a] == [s["text"] for s in b]
    top_share = [Counter(s["label"]).most_common(1)[0][1] / len(s) for s in a]
    assert max(top_share) > 0.3  # far from the IID share of 0.1


def test_partition_errors() -> None:
    ds = _labelled(10, 2)
    with pytest.raises(UsageError, match="clients=20 but the training set has only 10"):
        partition(ds, "iid", 20, "label")
    with pytest.raises(UsageError, match="gives 2 clients; set clients=2"):
        partition(ds, "natural", 3, "label")
    with pytest.raises(UsageError, match="cannot partition by 'topic'"):
        partition(ds, "dirichlet", 2, "topic")


def test_instruction_encoding_masks_the_prompt(gen_file: Path) -> None:
    task = load_task(str(gen_file))
    tokenizer = load_model("tiny-llama", "generation").tokenizer
    examples = encode_generation(task.train.select(range(4)), tokenizer, max_len=128)
    for e in examples:
        labels = e.labels
        assert (labels[: e.prompt_len] == IGNORE_INDEX).all()
        assert (labels[e.prompt_len :] != IGNORE_INDEX).all()
        response_text = tokenizer.decode(e.input_ids[e.prompt_len :])
        assert "plus" in response_text and "<|im_end|>" in response_text
        assert "<|im_start|>assistant" in tokenizer.decode(e.input_ids[: e.prompt_len])
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.labels.shape == batch.input_ids.shape
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()


def test_truncation_keeps_the_response(gen_file: Path) -> None:
    task = load_task(str(gen_file))
    tokenizer = load_model("tiny-llama", "generation").tokenizer
    [example] = encode_generation(task.train.select([0]), tokenizer, max_len=24)
    assert len(example.input_ids) == 24
    assert (example.labels != IGNORE_INDEX).sum() >= 12


def test_scored_examples_hold_choices(tmp_path: Path) -> None:
    rows = datasets.Dataset.from_dict(
        {"prompt": ["Is the sky blue?"], "response": ["true"], "choices": [["true", "false"]], "answer": [0], "final": [""]}
    )
    tokenizer = load_model("tiny-llama", "generation").tokenizer
    [example] = encode_scored(rows, tokenizer, max_len=64)
    assert example.choices is not None and len(example.choices) == 2
    assert tokenizer.decode(example.choices[1]) == "false"


def test_local_file_needs_known_columns(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text('{"foo": "x", "bar": 1}\n{"foo": "y", "bar": 0}\n')
    with pytest.raises(UsageError, match="cannot find"):
        load_task(str(path))
    task = load_task(str(path), fields=FieldMap(text="foo", label="bar"))
    assert task.kind == "classification" and task.num_labels == 2


def test_unknown_name_offline_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown dataset"):
        load_task("someone/some-dataset-that-is-not-here")


@requires_shared_data
def test_several_datasets_make_a_multi_task_federation() -> None:
    from fedtune.data.sources import load_tasks

    task = load_tasks(["glue/rte", "glue/mrpc"], str(shared_data_dir()))
    assert task.natural_key == "task" and task.num_labels == 2
    assert len(task.train) == 2490 + 3667
    shards = partition(task.train, "natural", 2, "task")
    assert sorted(len(set(s["task"])) for s in shards) == [1, 1]
    assert sorted(len(s) for s in shards) == [2490, 3667]
    with pytest.raises(UsageError, match="cannot combine classification and generation"):
        load_tasks(["glue/rte", "gsm8k"], str(shared_data_dir()))
    with pytest.raises(UsageError, match="equal label counts"):
        load_tasks(["glue/rte", "20newsgroups"], str(shared_data_dir()))


def test_classification_encoding_mixes_single_sentences_and_pairs() -> None:
    from fedtune.data.encode import encode_classification

    rows = datasets.Dataset.from_dict(
        {"text": ["a b", "c d", "e"], "text_pair": [None, "x y", None], "label": [0, 1, 0]},
        features=datasets.Features(
            {"text": datasets.Value("string"), "text_pair": datasets.Value("string"), "label": datasets.Value("int64")}
        ),
    )
    tokenizer = load_model("tiny-bert", "classification", num_labels=2).tokenizer
    examples = encode_classification(rows, tokenizer, 32)
    assert [e.labels for e in examples] == [0, 1, 0]
    assert tokenizer.decode(examples[1].input_ids).count("[SEP]") == 2
    assert tokenizer.decode(examples[0].input_ids).count("[SEP]") == 1


def test_a_users_rows_with_candidate_answers_are_multiple_choice(tmp_path: Path) -> None:
    import json

    from fedtune.errors import UsageError

    path = tmp_path / "mc.jsonl"
    rows = [
        {"prompt": "2 + 2?", "response": "4", "choices": ["3", "4", "5"], "answer": 1},
        {"prompt": "Sky colour?", "response": "blue", "choices": ["blue", "green"], "answer": "blue"},  # the gold text
    ] * 10
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(str(path), seed=0)
    assert task.kind == "generation" and task.metric == "multiple_choice"
    both = datasets.concatenate_datasets([task.train, task.test])
    assert sorted({(tuple(r["choices"]), r["answer"]) for r in both}) == [(("3", "4", "5"), 1), (("blue", "green"), 0)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in rows))
    assert load_task(str(plain), seed=0).metric == "perplexity"
    # no response column: the answer is the gold index (here a float, as pandas writes an int column with gaps)
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["red", "blue", "green"], "answer": float(i % 3)}) + "\n" for i in range(12)))
    task = load_task(str(bare), seed=0)
    both = datasets.concatenate_datasets([task.train, task.test])
    assert task.metric == "multiple_choice" and all(r["response"] == r["choices"][r["answer"]] for r in both)
    assert sorted(r["answer"] for r in both) == sorted(i % 3 for i in range(12))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": "y", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(UsageError, match="row 1: 'answer' must be the index or the text of one of its 2 choices, got 2"):
        load_task(str(bad), seed=0)


def test_natural_partition_prints_nothing(capfd) -> None:
    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(9)], "task": ["a", "b", "c"] * 3})
    shards = partition(ds, "natural", 3, "task")
    assert sorted(len(s) for s in shards) == [3, 3, 3]
    assert sorted(set(s["task"][0] for s in shards)) == ["a", "b", "c"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # flwr-datasets' own progress bar is not shown
