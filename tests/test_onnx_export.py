"""ONNX export of the tiny models of both families: every graph against torch in onnxruntime, the files' names and
dimensions, and LoRAs merged through the weight maps (exactly what the TensorRT refitter is given) against the torch
engines' own merge."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from diffusers import ControlNetModel
from onnx import numpy_helper

from swiftdiffusion import onnx_export, tiny
from swiftdiffusion.engines import LayerDelta, WeightPatch
from swiftdiffusion.lora import build_patch, decode_lora, read_lora
from swiftdiffusion.models import ModelComponents, load_components, torch_engines
from swiftdiffusion.onnx_export import WeightEntry, WeightMap

TOLERANCE = 1e-4
GRAPHS = {"unet", "unet_encoder", "unet_decoder", "vae_decoder", "controlnet_canny", "controlnet_depth"}


class Exported(NamedTuple):
    root: Path  # the tiny model's folder (model, controlnets, loras)
    out: Path  # the export folder
    components: ModelComponents
    manifest: dict


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def exported(request, family_roots, tmp_path_factory, one_torch_thread) -> Exported:
    root = family_roots[request.param]
    components = load_components(root / "model")
    controlnets = {name: root / "controlnets" / name for name in tiny.CONTROLNET_NAMES}
    out = tmp_path_factory.mktemp(f"onnx_{request.param}")
    manifest = onnx_export.export_model(components, controlnets, out, log=lambda line: None)
    return Exported(root, out, components, manifest)


def sources(components) -> dict[str, onnx_export.GraphSource]:
    return {source.name: source for source in onnx_export.graph_sources(components, {})}


def session(path: Path, replaced: dict[str, np.ndarray] | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime session of an ONNX file, with some initializers replaced (the refit, done in onnxruntime)."""
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if replaced and init.name in replaced:
            init.CopyFrom(numpy_helper.from_array(replaced[init.name], init.name))
    return onnxruntime.InferenceSession(model.SerializeToString(), onnx_export.cpu_session_options(),
                                        providers=["CPUExecutionProvider"])


def test_every_graph_matches_torch_at_both_sizes_and_batches(exported):
    manifest = exported.manifest
    family = exported.components.family
    assert set(manifest["graphs"]) == GRAPHS | set(family.text_components)
    assert manifest["opset"] >= 17 and manifest["family"] == family.name
    assert manifest["default_size"] == {"sd15": 512, "sdxl": 1024}[family.name]
    # TensorRT builds SDXL's VAE (force_upcast) in fp32, as diffusers decodes it.
    assert manifest["graphs"]["vae_decoder"].get("fp32", False) == (family.name == "sdxl")
    for name, graph in manifest["graphs"].items():
        checks = {(c["batch"], c["height"], c["width"]): c["max_abs_diff"] for c in graph["checks"]}
        assert set(checks) == {(1, 8, 8), (2, 8, 8), (1, 12, 8), (2, 12, 8)}, name
        assert max(checks.values()) <= TOLERANCE, (name, checks)


def test_files_have_the_spec_names_and_the_manifest_dims(exported):
    root, out, components, manifest = exported
    controlnets = {name: ControlNetModel.from_pretrained(root / "controlnets" / name) for name in tiny.CONTROLNET_NAMES}
    all_sources = {source.name: source for source in onnx_export.graph_sources(components, controlnets)}
    for name, graph in manifest["graphs"].items():
        source = all_sources[name]
        model = onnx.load(str(out / graph["file"]))
        assert model.opset_import[0].version == manifest["opset"]
        assert [v.name for v in model.graph.input] == list(source.spec.inputs) == list(graph["inputs"])
        assert [v.name for v in model.graph.output] == list(source.spec.outputs) == list(graph["outputs"])
        # The manifest's dims, resolved at an odd latent size, are the shapes onnxruntime takes and gives.
        inputs = onnx_export.sample_inputs(source, components, 2, 12, 8)
        outputs = session(out / graph["file"]).run(None, {k: v.numpy() for k, v in inputs.items()})
        infos = [*graph["inputs"].values(), *graph["outputs"].values()]
        for info, tensor in zip(infos, [*inputs.values(), *outputs]):
            assert tuple(onnx_export.resolve_dim(d, 2, 12, 8) for d in info["dims"]) == tuple(tensor.shape), name
    assert manifest["graphs"]["unet"]["inputs"]["timestep"] == {"dims": [1], "dtype": "float32"}
    assert manifest["graphs"]["text_encoder"]["inputs"]["input_ids"] == {"dims": ["batch", 77], "dtype": "int64"}


def test_weight_maps_hold_every_lora_target(exported):
    _, out, components, manifest = exported
    maps = {name: WeightMap.load(out / graph["weights"])
            for name, graph in manifest["graphs"].items() if "weights" in graph}
    texts = components.family.text_components
    assert set(maps) == {"unet", "unet_encoder", "unet_decoder", *texts}
    modules = {"unet": components.unet, "unet_encoder": components.unet, "unet_decoder": components.unet,
               **{name: getattr(components, name) for name in texts}}
    for name, weight_map in maps.items():
        params = dict(modules[name].named_parameters())
        # Every parameter is accounted for once: mapped, unused by this graph, or listed as unmappable.
        groups = [set(weight_map.weights), set(weight_map.unused), set(weight_map.unmappable)]
        assert sum(map(len, groups)) == len(params) and set().union(*groups) == set(params), name
        # Each mapping is exact: the initializer is the parameter, laid out as its transform says.
        stored = onnx_export.load_initializers(out / manifest["graphs"][name]["file"])
        for param, entry in weight_map.weights.items():
            value = params[param].detach().numpy()
            value = value.T if entry.transform == "transpose" else value.reshape(stored[entry.initializer].shape)
            assert np.array_equal(value, stored[entry.initializer]), (name, param)
    targets = {"unet": {f"{m}.weight" for m in tiny.lora_targets(components.unet, tiny.UNET_LORA_SUFFIXES)},
               **{name: {f"{m}.weight" for m in tiny.lora_targets(modules[name], tiny.TEXT_LORA_SUFFIXES)}
                  for name in texts}}
    assert all(targets.values())
    halves = set(maps["unet_encoder"].weights) | set(maps["unet_decoder"].weights)
    assert targets["unet"] <= set(maps["unet"].weights) and targets["unet"] <= halves
    for name, names in targets.items():
        assert names <= set(maps[name].weights), name
        initializers = [maps[name].weights[t].initializer for t in names]
        assert len(set(initializers)) == len(initializers), "two LoRA targets share an initializer"


def test_lora_merged_through_weight_map_matches_torch(exported):
    root, out, _, manifest = exported
    components = load_components(root / "model")
    loaded = torch_engines(components, "cpu", torch.float32)
    lora = decode_lora("character_kohya", read_lora("character_kohya", root / "loras" / "character_kohya.safetensors"),
                       loaded.lora_target)
    assert all(lora.touches(component) for component in components.family.lora_components)
    graph_sources = sources(components)
    for name in (*components.family.text_components, "unet", "unet_encoder", "unet_decoder"):
        graph = manifest["graphs"][name]
        path = out / graph["file"]
        weight_map = WeightMap.load(out / graph["weights"])
        patch = build_patch(graph["component"], [(lora, 0.8)], torch.device("cpu"), torch.float32)
        merged = onnx_export.refit_weights(weight_map, onnx_export.load_initializers(path), patch)
        assert set(merged) == {weight_map.weights[p].initializer for p in patch.layers if p in weight_map.weights}
        inputs = onnx_export.sample_inputs(graph_sources[name], components, 2, 12, 8)
        got = session(path, merged).run(None, {k: v.numpy() for k, v in inputs.items()})
        engine = loaded.engines[name]
        plain = engine(inputs)
        engine.patch(patch)
        try:
            expected = engine(inputs)
        finally:
            engine.restore()
        diff = max(float(np.abs(g - expected[out].numpy()).max()) for out, g in zip(graph["outputs"], got))
        change = max(float((expected[out] - plain[out]).abs().max()) for out in graph["outputs"])
        assert diff <= TOLERANCE and change > 100 * TOLERANCE, (name, diff, change)


def test_big_graphs_keep_their_weights_in_one_external_file(exported, tmp_path):
    _, out, components, _ = exported
    source = sources(components)["text_encoder"]
    model = onnx_export.export_graph(source, onnx_export.sample_inputs(source, components, 1, 8, 8),
                                     onnx_export.dynamic_axes(source, components.unet.config))
    path = tmp_path / "text_encoder.onnx"
    assert onnx_export.save_onnx(model, path, external_threshold=0)
    assert {p.name for p in tmp_path.iterdir()} == {"text_encoder.onnx", "text_encoder.onnx.data"}
    inputs = onnx_export.sample_inputs(source, components, 2, 12, 8)
    assert onnx_export.verify_graph(path, source.module, source.spec, [inputs])[0] <= TOLERANCE
    stored = onnx_export.load_initializers(path)
    assert stored.keys() == onnx_export.load_initializers(out / "text_encoder.onnx").keys()


def test_refit_weights_lays_out_each_transform_and_refuses_what_it_cannot_patch():
    weight_map = WeightMap(
        weights={"lin.weight": WeightEntry("onnx::MatMul_7", "transpose", (3, 2)),
                 "conv.weight": WeightEntry("conv.weight", "none", (3, 2, 1, 1)),
                 "norm.weight": WeightEntry("onnx::Mul_9", "reshape", (3,)),
                 "a.weight": WeightEntry("shared", "none", (3, 2)), "b.weight": WeightEntry("shared", "none", (3, 2))},
        unused=["other.weight"], unmappable={"folded.weight": "no initializer holds its value"})
    lin, conv, norm = torch.randn(3, 2), torch.randn(3, 2, 1, 1), torch.randn(3)
    pristine = {"onnx::MatMul_7": lin.T.numpy().copy(), "conv.weight": conv.numpy(),
                "onnx::Mul_9": norm.reshape(3, 1, 1).numpy(), "shared": np.zeros((3, 2), np.float32)}
    up, down = torch.randn(3, 1), torch.randn(1, 2)
    delta = LayerDelta(up, down)
    patch = WeightPatch(("x",), {"lin.weight": delta, "conv.weight": delta, "other.weight": delta,
                                 "norm.weight": LayerDelta(up, torch.ones(1, 1))})
    merged = onnx_export.refit_weights(weight_map, pristine, patch)
    assert set(merged) == {"onnx::MatMul_7", "conv.weight", "onnx::Mul_9"}
    torch.testing.assert_close(torch.from_numpy(merged["onnx::MatMul_7"]), (lin + up @ down).T)
    torch.testing.assert_close(torch.from_numpy(merged["conv.weight"]), conv + (up @ down)[:, :, None, None])
    torch.testing.assert_close(torch.from_numpy(merged["onnx::Mul_9"]), (norm + up[:, 0]).reshape(3, 1, 1))
    refused = (("folded.weight", "no initializer"), ("a.weight", "also holds"), ("nope.weight", "not a weight"))
    for bad, message in refused:
        with pytest.raises(ValueError, match=message):
            onnx_export.refit_weights(weight_map, pristine, WeightPatch(("y",), {bad: delta}))


def test_resolve_dim():
    assert [onnx_export.resolve_dim(d, 2, 12, 9) for d in (4, "batch", "height", "width/2", "height/8", "width*8")] \
        == [4, 2, 12, 5, 2, 72]
    with pytest.raises(ValueError):
        onnx_export.resolve_dim("depth", 1, 8, 8)
