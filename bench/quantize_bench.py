"""quantize=4bit|8bit: the stored size of the base models, against float32."""

from __future__ import annotations

from pathlib import Path

from common import write


def _stored_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def bench_quantize(out: Path) -> None:
    from fedtune.models.loading import load_model

    sizes: dict[str, dict[str, float]] = {}
    for name, task, labels in (("minilm", "classification", 20), ("smollm2-135m", "generation", 0)):
        sizes[name] = {}
        for mode in ("none", "8bit", "4bit"):
            loaded = load_model(name, task, labels, quantize=mode, device="cpu")
            sizes[name][mode] = _stored_bytes(loaded.model) / 2**20
            del loaded
    write(
        out,
        "quantized_base_memory",
        {
            "definition": "MiB of a base model's parameters and buffers as stored (4-bit weights at half a byte, plus "
            "their quantisation constants); embeddings, norms and the head stay float32",
            "mib": sizes,
            "ratio_to_fp32": {n: {m: v / s["none"] for m, v in s.items()} for n, s in sizes.items()},
        },
    )
