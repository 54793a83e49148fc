"""Base models, tokenizers and the binding of their trainable tensors to state keys."""

from fedtune.models.binding import ModelBinding, bind_full, bind_lora
from fedtune.models.loading import BUILTIN_MODELS, LoadedModel, load_model

__all__ = ["BUILTIN_MODELS", "LoadedModel", "ModelBinding", "bind_full", "bind_lora", "load_model"]
