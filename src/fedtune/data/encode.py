"""Turn normalised rows into token (or pixel) tensors, and those into padded batches.

Everything is tokenised once, before the first round: a client's turn then only slices
and pads tensors, which keeps the simulator's overhead per step near zero.

Instruction rows are formatted with the tokenizer's chat template (user turn = prompt,
assistant turn = response); the loss covers the response tokens only (labels -100 on the
prompt). Tokenizers without a chat template use a plain ``### Instruction / ### Response``
layout.

Image rows become uint8 pixels at the model's input size (``fedtune.models.vision``), and a
batch of them is normalised as the model's image processor says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

IGNORE_INDEX = -100
FALLBACK_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class Example:
    """One tokenised example.

    ``labels`` is an int class id (classification) or a per-token list (language modelling).
    Scored generation tasks also carry ``choices`` (token ids of each candidate response)
    with the gold ``answer`` index, or the gold ``final`` answer string.
    """

    input_ids: torch.Tensor
    labels: int | torch.Tensor
    prompt_len: int = 0
    choices: list[torch.Tensor] | None = None
    answer: int = -1
    final: str = ""
    #: an image example: uint8 pixels (1 or 3 x size x size) and how to normalise them
    pixels: torch.Tensor | None = None
    image_inputs: Any = None


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class InstructionFormatter:
    """Prompt and response token ids for one tokenizer (chat template or fallback)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.use_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.use_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return _ids(self.tokenizer, text)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + _ids(self.tokenizer, FALLBACK_PROMPT.format(prompt=prompt))

    def response_ids(self, prompt: str, response: str) -> list[int]:
        """The assistant turn's tokens, end-of-turn marker included, as the template writes it."""
        if self.use_template:
            prompt_text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            full_text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
            )
            if full_text.startswith(prompt_text):
                return _ids(self.tokenizer, full_text[len(prompt_text) :])
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        return _ids(self.tokenizer, response) + eos

    def choice_ids(self, choice: str) -> list[int]:
        """A candidate answer as scored for multiple choice: its text tokens, no end marker."""
        return _ids(self.tokenizer, choice)


def _fit(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Truncate to ``max_len``: keep at least half the budget for the response, the prompt's tail."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    response = response[: max(max_len // 2, max_len - len(prompt))]
    prompt = prompt[len(prompt) - (max_len - len(response)) :] if max_len > len(response) else []
    return prompt, response


def encode_classification(rows: datasets.Dataset, tokenizer: Any, max_len: int) -> list[Example]:
    """Single sentences and sentence pairs (a multi-task federation mixes both)."""
    texts, pairs, labels = list(rows["text"]), list(rows["text_pair"]), list(rows["label"])
    ids: list[list[int] | None] = [None] * len(texts)
    for paired in (False, True):
        chosen = [i for i, p in enumerate(pairs) if (p is not None) == paired]
        if not chosen:
            continue
        encoded = tokenizer(
            [texts[i] for i in chosen],
            [pairs[i] for i in chosen] if paired else None,
            truncation=True,
            max_length=max_len,
            add_special_tokens=True,
        )["input_ids"]
        for i, row_ids in zip(chosen, encoded):
            ids[i] = row_ids
    return [Example(torch.tensor(row_ids, dtype=torch.long), int(label)) for row_ids, label in zip(ids, labels)]


def encode_generation(rows: datasets.Dataset, tokenizer: Any, max_len: int) -> list[Example]:
    """Language-modelling examples: prompt + response, loss on the response tokens."""
    fmt = InstructionFormatter(tokenizer)
    examples = []
    for row in rows:
        prompt, response = _fit(fmt.prompt_ids(row["prompt"]), fmt.response_ids(row["prompt"], row["response"]), max_len)
        ids = torch.tensor(prompt + response, dtype=torch.long)
        labels = ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        examples.append(Example(ids, labels, prompt_len=len(prompt)))
    return examples


def encode_scored(rows: datasets.Dataset, tokenizer: Any, max_len: int) -> list[Example]:
    """Prompt-only examples for scored evaluation: with candidate ``choices`` (multiple
    choice, scored by log-likelihood) or with the gold ``final`` answer (generation)."""
    fmt = InstructionFormatter(tokenizer)
    examples = []
    for row in rows:
        prompt = fmt.prompt_ids(row["prompt"])
        choices = [torch.tensor(fmt.choice_ids(c), dtype=torch.long) for c in row["choices"]]
        room = max_len - max((len(c) for c in choices), default=0)
        ids = torch.tensor(prompt[-max(room, 1) :], dtype=torch.long)
        examples.append(
            Example(ids, -1, prompt_len=len(ids), choices=choices or None, answer=int(row["answer"]), final=row["final"])
        )
    return examples


def encode_images(rows: datasets.Dataset, image_inputs: Any) -> list[Example]:
    """Image classification examples: each image resized once to the model's input size."""
    no_tokens = torch.empty(0, dtype=torch.long)
    return [
        Example(no_tokens, int(label), pixels=image_inputs.encode(image), image_inputs=image_inputs)
        for image, label in zip(rows["image"], rows["label"])
    ]


@dataclass
class Batch:
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    pixel_values: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(move(self.input_ids), move(self.attention_mask), self.labels.to(device), move(self.pixel_values))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward (without labels)."""
        if self.pixel_values is not None:
            return {"pixel_values": self.pixel_values}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}  # type: ignore[dict-item]

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens seen (text), or images (an image is one input of a fixed size)."""
        return int(self.attention_mask.sum()) if self.attention_mask is not None else self.size


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded batch; class labels as a vector, token labels padded with -100; image
    examples as one normalised pixel tensor."""
    if examples[0].pixels is not None:
        labels = torch.tensor([int(e.labels) for e in examples], dtype=torch.long)  # type: ignore[arg-type]
        return Batch(None, None, labels, examples[0].image_inputs.batch([e.pixels for e in examples]))
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    token_labels = not isinstance(examples[0].labels, int)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = e.input_ids
        mask[i, :n] = 1
        if labels is not None:
            labels[i, :n] = e.labels  # type: ignore[index]
    if labels is None:
        labels = torch.tensor([int(e.labels) for e in examples], dtype=torch.long)  # type: ignore[arg-type]
    return Batch(ids, mask, labels)
