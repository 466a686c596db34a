"""The TensorRT layer: what runs without TensorRT (import, the missing-TensorRT errors, optimization profiles from the
manifest), and, where TensorRT and a CUDA GPU exist, engines built from the tiny model's ONNX against torch, LoRA
refit included."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swiftdiffusion import onnx_export, tensorrt_runtime
from swiftdiffusion.graphs import GraphSpec
from swiftdiffusion.lora import build_patch, decode_lora, read_lora
from swiftdiffusion.models import load_components, torch_engines

ROOT = Path(__file__).resolve().parents[1]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
MISSING_REASON = "TensorRT is not installed (NVIDIA's package index is unreachable here)"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed")
def test_without_tensorrt_the_module_imports_and_every_entry_point_says_so(tmp_path):
    with pytest.raises(tensorrt_runtime.TensorRTMissing, match="TensorRT is not installed"):
        tensorrt_runtime.build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", [])
    with pytest.raises(tensorrt_runtime.TensorRTMissing, match="TensorRT is not installed"):
        tensorrt_runtime.TensorRTEngine(tmp_path / "x.plan", GraphSpec(("a",), ("b",)))
    result = subprocess.run([sys.executable, str(ROOT / "export" / "build_engines.py"), "--onnx", str(tmp_path),
                             "--out", str(tmp_path / "plans")], capture_output=True, text=True)
    assert result.returncode == 2 and "TensorRT is not installed" in result.stderr


def test_profile_shapes_resolve_the_manifest_dims():
    graph = {"inputs": {
        "sample": {"dims": ["batch", 4, "height", "width"]},
        "timestep": {"dims": [1]},
        "down_3": {"dims": ["batch", 32, "height/2", "width/2"]},
        "controlnet_cond": {"dims": ["batch", 3, "height*8", "width*8"]},
    }}
    shapes = tensorrt_runtime.profile_shapes(graph, (1, 8, 8), (2, 64, 64), (2, 128, 96))
    assert shapes == {
        "sample": ((1, 4, 8, 8), (2, 4, 64, 64), (2, 4, 128, 96)),
        "down_3": ((1, 32, 4, 4), (2, 32, 32, 32), (2, 32, 64, 48)),
        "controlnet_cond": ((1, 3, 64, 64), (2, 3, 512, 512), (2, 3, 1024, 768)),
    }


@pytest.fixture(scope="module")
def built(tiny_root, tmp_path_factory):
    """(model root, export folder, the full UNet's fp32 refittable plan)."""
    pytest.importorskip("tensorrt", reason=MISSING_REASON)
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    out = tmp_path_factory.mktemp("onnx")
    manifest = onnx_export.export_model(tiny_root / "model", {}, out, verify=False, log=lambda line: None)
    graph = manifest["graphs"]["unet"]
    profile = tensorrt_runtime.profile_shapes(graph, (1, 8, 8), (2, 12, 8), (2, 16, 16))
    plan = tensorrt_runtime.build_engine(out / graph["file"], out / "unet.plan", [profile], fp16=False,
                                         refittable=True)
    return tiny_root, out, plan


@pytest.mark.tensorrt
def test_tensorrt_unet_matches_torch_and_refits_loras(built):
    root, out, plan = built
    engine = tensorrt_runtime.TensorRTEngine.from_export(out, plan, "unet")
    components = load_components(root / "model")
    loaded = torch_engines(components, "cuda", torch.float32)
    reference = loaded.engines["unet"]
    source = {s.name: s for s in onnx_export.graph_sources(components, {})}["unet"]
    inputs = {k: v.cuda() for k, v in onnx_export.sample_inputs(source, components, 2, 12, 8).items()}
    plain = engine(inputs)["noise_pred"]
    torch.testing.assert_close(plain, reference(inputs)["noise_pred"], atol=1e-3, rtol=1e-3)

    path = root / "loras" / "character_kohya.safetensors"
    lora = decode_lora("kohya", read_lora("kohya", path), loaded.lora_target)
    patch = build_patch("unet", [(lora, 0.8)], torch.device("cpu"), torch.float32)
    refits = []
    refit = engine._refit
    engine._refit = lambda arrays: (refits.append(len(arrays)), refit(arrays))
    engine.patch(patch)
    engine.patch(patch)  # same key: no second refit
    assert len(refits) == 1
    reference.patch(patch)
    try:
        torch.testing.assert_close(engine(inputs)["noise_pred"], reference(inputs)["noise_pred"], atol=1e-3, rtol=1e-3)
    finally:
        reference.restore()
    engine.restore()
    torch.testing.assert_close(engine(inputs)["noise_pred"], plain, atol=1e-5, rtol=0)
