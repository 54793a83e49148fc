"""Hub loaders map each public dataset's own schema onto fedtune's (Hub faked: no network)."""

from __future__ import annotations

import datasets
import pytest

from fedtune.data import sources
from fedtune.data.sources import load_task


def fake_hub(tables: dict[tuple, dict[str, list]]):
    def load_dataset(name, config=None, **kwargs):
        splits = tables[(name, config)]
        return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()})

    return load_dataset


@pytest.fixture(autouse=True)
def no_local_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDTUNE_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_arc_and_boolq_from_hub_match_local_prompt_format(monkeypatch: pytest.MonkeyPatch) -> None:
    arc_row = {
        "question": "Which is a planet?",
        "choices": {"text": ["Sun", "Mars", "Moon"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    boolq_row = {"question": "is water wet", "answer": True, "passage": "..."}
    monkeypatch.setattr(
        sources.datasets,
        "load_dataset",
        fake_hub(
            {
                ("allenai/ai2_arc", "ARC-Easy"): {"train": [arc_row], "test": [arc_row]},
                ("google/boolq", None): {"train": [boolq_row], "validation": [boolq_row]},
            }
        ),
    )
    arc = load_task("arc-e")
    row = arc.test[0]
    assert row["prompt"].startswith("Please choose the correct answer to the question: Which is a planet?")
    assert "Answer2: Mars" in row["prompt"] and row["prompt"].endswith("Answer format: answer1/answer2/answer3")
    assert row["response"] == "the correct answer is answer2" and row["answer"] == 1
    text_form = load_task("arc-e-text").test[0]
    assert text_form["prompt"] == "Answer the question.\nQuestion: Which is a planet?"
    assert text_form["choices"] == ["Sun", "Mars", "Moon"] and text_form["answer"] == 1 and text_form["response"] == "Mars"
    boolq = load_task("boolq")
    assert boolq.test[0]["choices"] == ["the correct answer is true", "the correct answer is false"]
    assert boolq.test[0]["answer"] == 0 and boolq.metric == "multiple_choice"


def test_glue_gsm8k_and_generic_hub_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        sources.datasets,
        "load_dataset",
        fake_hub(
            {
                ("nyu-mll/glue", "mrpc"): {
                    "train": [{"sentence1": "a", "sentence2": "b", "label": 1}],
                    "validation": [{"sentence1": "c", "sentence2": "d", "label": 0}],
                },
                ("openai/gsm8k", "main"): {
                    "train": [{"question": "1+1?", "answer": "1+1=2\n#### 2"}],
                    "test": [{"question": "2+2?", "answer": "#### 4"}],
                },
                ("someone/reviews", None): {
                    "train": [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}],
                    "test": [{"text": "fine", "label": "pos"}],
                },
            }
        ),
    )
    mrpc = load_task("glue/mrpc")
    assert (mrpc.train[0]["text"], mrpc.train[0]["text_pair"], mrpc.train[0]["label"]) == ("a", "b", 1)
    gsm = load_task("gsm8k")
    assert gsm.train[0]["final"] == "2" and gsm.test[0]["final"] == "4"
    reviews = load_task("someone/reviews")
    assert reviews.kind == "classification" and reviews.label_names == ["neg", "pos"]
    assert reviews.source == "hub:someone/reviews"


@pytest.mark.parametrize(("offline_mode", "why"), [(False, "the Hub is unreachable"), (True, "Hub access is off .*unset it")])
def test_builtin_without_local_copy_and_no_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, offline_mode: bool, why: str) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(sources.datasets, "load_dataset", offline)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if offline_mode:
            monkeypatch.setenv(key, "1")
        else:
            monkeypatch.delenv(key, raising=False)
    with pytest.raises(sources.UsageError, match=f"no local copy \\(set data_dir= or FEDTUNE_DATA_DIR to a folder with .*\\) and {why}"):
        load_task("gsm8k")
