"""Multiple-choice scoring computes logits only where the choices are, with the same scores."""

from __future__ import annotations

import math

import peft
import pytest
import torch

from fedtune.data.encode import Example
from fedtune.models.loading import load_model
from fedtune.runtime.evaluation import choice_scores, evaluate_multiple_choice, logits_at


def _reference_scores(model: torch.nn.Module, examples: list[Example]) -> torch.Tensor:
    """Summed choice log-probabilities, one unpadded sequence at a time, from the full logits."""
    scores = torch.full((len(examples), 3), -math.inf)
    for i, e in enumerate(examples):
        for j, choice in enumerate(e.choices or []):
            seq = torch.cat([e.input_ids, choice])
            logprobs = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), dim=-1)
            positions = torch.arange(len(e.input_ids) - 1, len(seq) - 1)
            scores[i, j] = logprobs[positions, choice].sum()
    return scores


def _examples(vocab: int) -> list[Example]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for i in range(7):
        prompt = torch.randint(5, vocab, (4 + 3 * i,), generator=generator)
        # choices of different lengths, so one batch mixes widths and prompt lengths
        choices = [torch.randint(5, vocab, (n,), generator=generator) for n in (1 + i % 3, 3, 2)]
        examples.append(Example(prompt, -1, len(prompt), choices, answer=i % 3))
    return examples


class _NoLogitsToKeep(torch.nn.Module):
    """A model whose forward has no ``logits_to_keep``: the fallback gathers from full logits."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class _IgnoresLogitsToKeep(torch.nn.Module):
    """A model that takes any keyword and returns full logits; counts its forward passes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **ignored: object):
        self.calls += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("wrap", ["plain", "peft", "no-logits-to-keep", "ignores-logits-to-keep"])
def test_choice_scores_match_full_logits(wrap: str) -> None:
    loaded = load_model("tiny-llama", "generation", seed=1)
    model = loaded.model
    if wrap == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    elif wrap == "no-logits-to-keep":
        model = _NoLogitsToKeep(model)
    elif wrap == "ignores-logits-to-keep":
        model = _IgnoresLogitsToKeep(model)
    model.eval()
    examples = _examples(len(loaded.tokenizer))
    with torch.no_grad():
        reference = _reference_scores(model, examples)
        positions = torch.tensor([[2, 3], [1, 1]])
        ids = torch.stack([examples[1].input_ids[:5], examples[2].input_ids[:5]])
        picked = logits_at(model, ids, torch.ones_like(ids), positions)
        if isinstance(model, _IgnoresLogitsToKeep):
            assert model.calls == 7 * 3 + 1  # the reference's passes, then one: no second pass without the keyword
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert picked.shape == (2, 2, full.shape[-1])
    torch.testing.assert_close(picked[0], full[0, [2, 3]])
    torch.testing.assert_close(picked[1], full[1, [1, 1]])

    cpu = torch.device("cpu")
    for batch_size in (1, 4, 64):  # padding and mixed widths in a batch change nothing
        scores = choice_scores(model, examples, batch_size, loaded.pad_token_id, cpu, "fp32")
        torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4)
    expected = float((reference.argmax(-1) == torch.tensor([e.answer for e in examples])).float().mean())
    assert evaluate_multiple_choice(model, examples, 4, loaded.pad_token_id, cpu, "fp32")["mc_accuracy"] == pytest.approx(expected)
