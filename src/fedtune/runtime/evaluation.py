"""Evaluation of the current model on tokenised examples.

- classification: ``accuracy`` and ``loss``
- language modelling: ``loss`` and ``perplexity`` on the response tokens
- multiple choice: ``mc_accuracy`` (the candidate answer with the highest log-likelihood)
- math: ``exact_match`` of the final number of a greedy generation
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedtune.data.builtin.gsm8k import final_answer
from fedtune.data.encode import IGNORE_INDEX, Example, collate
from fedtune.runtime.local_training import autocast


def _sorted_chunks(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    # Similar lengths in one batch waste less compute on padding.
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def evaluate_classification(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device, precision: str
) -> dict[str, float]:
    correct, loss_sum, count = 0, 0.0, 0
    for chunk in _sorted_chunks(examples, batch_size):
        batch = collate(chunk, pad_id).to(device)
        with autocast(device, precision):
            logits = model(**batch.model_inputs()).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        correct += int((logits.argmax(-1) == batch.labels).sum())
        count += len(chunk)
    return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1)}


@torch.no_grad()
def evaluate_language_model(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device, precision: str
) -> dict[str, float]:
    loss_sum, tokens = 0.0, 0
    for chunk in _sorted_chunks(examples, batch_size):
        batch = collate(chunk, pad_id).to(device)
        with autocast(device, precision):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        targets = batch.labels[:, 1:]
        loss_sum += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        tokens += int((targets != IGNORE_INDEX).sum())
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits only at ``positions`` (batch x k): shape (batch, k, vocab).

    A choice is a few tokens after a long prompt, so projecting every position onto the
    vocabulary (49k for SmolLM2) and soft-maxing it would be most of an evaluation's time and
    memory. transformers' causal LMs take the positions as ``logits_to_keep``; from a model
    that rejects or ignores it, the full logits are gathered (one forward pass either way:
    the positions are fewer than the sequence's tokens, so the shapes tell the two apart).
    """
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if logits.shape[:2] == positions.shape:
        return logits
    return torch.take_along_dim(logits, positions[..., None], dim=1)


@torch.no_grad()
def choice_scores(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device, precision: str
) -> torch.Tensor:
    """(examples x choices): the summed log-probability of each candidate's tokens after the prompt."""
    sequences: list[tuple[int, int, torch.Tensor, int]] = []  # (example, choice, ids, prompt_len)
    for i, e in enumerate(examples):
        for j, choice in enumerate(e.choices or []):
            sequences.append((i, j, torch.cat([e.input_ids, choice]), len(e.input_ids)))
    scores = torch.full((len(examples), max((len(e.choices or []) for e in examples), default=1)), -math.inf)
    sequences.sort(key=lambda s: len(s[2]))
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        length = max(len(s[2]) for s in chunk)
        width = max(len(seq) - prompt_len for _, _, seq, prompt_len in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        # the position predicting each choice token, the last one repeated to a common width
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, _, seq, prompt_len) in enumerate(chunk):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
            positions[row] = torch.arange(prompt_len - 1, prompt_len - 1 + width).clamp(max=len(seq) - 2)
        with autocast(device, precision):
            logits = logits_at(model, ids.to(device), mask.to(device), positions.to(device))
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, (i, j, seq, prompt_len) in enumerate(chunk):
            tokens = seq[prompt_len:]
            scores[i, j] = float(logprobs[row, torch.arange(len(tokens)), tokens].sum())
    return scores


def evaluate_multiple_choice(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device, precision: str
) -> dict[str, float]:
    """The share of examples whose gold candidate scores highest."""
    scores = choice_scores(model, examples, batch_size, pad_id, device, precision)
    answers = torch.tensor([e.answer for e in examples])
    return {"mc_accuracy": float((scores.argmax(-1) == answers).float().mean()) if examples else 0.0}


@torch.no_grad()
def evaluate_exact_match(
    model: torch.nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    precision: str,
    tokenizer: object,
    max_new_tokens: int,
) -> dict[str, float]:
    """Greedy generation (left-padded batches), compare final numbers."""
    correct = 0
    for chunk in _sorted_chunks(examples, batch_size):
        length = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(chunk):
            ids[row, length - len(e.input_ids) :] = e.input_ids
            mask[row, length - len(e.input_ids) :] = 1
        with autocast(device, precision):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        for row, e in enumerate(chunk):
            text = tokenizer.decode(out[row, length:], skip_special_tokens=True)  # type: ignore[attr-defined]
            correct += int(final_answer(text, e.final) == e.final and e.final != "")
    return {"exact_match": correct / max(len(examples), 1)}


def evaluate(
    model: torch.nn.Module,
    metric: str,
    examples: Sequence[Example],
    scored: Sequence[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
    tokenizer: object | None = None,
    max_new_tokens: int = 256,
) -> dict[str, float]:
    """All metrics of a task on one model state."""
    if not examples:
        return {}
    if metric == "accuracy":
        return evaluate_classification(model, examples, batch_size, pad_id, device, precision)
    results = evaluate_language_model(model, examples, batch_size, pad_id, device, precision)
    if metric == "multiple_choice" and scored:
        results.update(evaluate_multiple_choice(model, scored, batch_size, pad_id, device, precision))
    if metric == "exact_match" and scored:
        results.update(
            evaluate_exact_match(model, scored, batch_size, pad_id, device, precision, tokenizer, max_new_tokens)
        )
    return results


#: the metric each task reports first and plots against bytes (higher is better unless noted)
PRIMARY_METRIC = {"accuracy": "accuracy", "multiple_choice": "mc_accuracy", "exact_match": "exact_match", "perplexity": "loss"}
