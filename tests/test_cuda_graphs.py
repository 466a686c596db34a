"""GraphedEngine: eager fallback on CPU (same outputs, same LoRA patching), graph replay against eager on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import control_image, max_diff
from swiftdiffusion.controlnets import ControlNetCatalog, LocalControlNets
from swiftdiffusion.cuda_graphs import GRAPHED, GraphedControlNetCatalog, GraphedEngine, graph_engines
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.models import LoadedModel, load_model
from swiftdiffusion.pipeline import Pipeline
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def engine_inputs(model: LoadedModel, batch: int = 2, size: int = 64, seed: int = 0) -> dict[str, dict]:
    """Random inputs for every graphed engine, on the model's device and dtype."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(model.device, model.dtype)

    latent = size // model.vae_scale_factor
    tokenizer = model.tokenizers["text_encoder"]
    text = rand(batch, tokenizer.model_max_length, model.unet_config["cross_attention_dim"])
    unet = {"sample": rand(batch, model.latent_channels, latent, latent),
            "timestep": torch.tensor([500.0], device=model.device), "encoder_hidden_states": text}
    hidden = model.engines["unet_encoder"](unet)
    decoder = {**hidden, "encoder_hidden_states": text}
    ids = torch.randint(0, len(tokenizer), (batch, tokenizer.model_max_length), generator=generator)
    layers = torch.tensor([model.text_layers["text_encoder"], 1][:batch], device=model.device)  # one per row
    return {"text_encoder": {"input_ids": ids.to(model.device), "hidden_layer": layers}, "unet": unet,
            "unet_encoder": unet, "unet_decoder": decoder,
            "vae_decoder": {"latent": rand(1, model.latent_channels, latent, latent)}}


def outputs_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def some_patch(root, model: LoadedModel):
    store = LoraStore(root / "loras", model.lora_target, model.device, model.dtype)
    return store.load([LoraUse("character_kohya", 0.8)])


def restored(models: tuple[LoadedModel, LoadedModel]):
    """The module-wide models, with W0 restored after the test whatever it patched."""
    yield models
    for engine in models[0].engines.values():
        engine.restore()


@pytest.fixture(scope="module")
def cpu_loaded(tiny_root):
    model = load_model(tiny_root / "model")
    return model, graph_engines(model)


@pytest.fixture
def cpu_models(cpu_loaded):
    yield from restored(cpu_loaded)


def test_cpu_falls_back_to_eager_with_identical_outputs(cpu_models):
    model, graphed = cpu_models
    inputs = engine_inputs(model)
    assert set(graphed.engines) == set(model.engines) == set(inputs)  # an SD1.5 model: no second text encoder
    for name in inputs:
        assert name in GRAPHED
        engine = graphed.engines[name]
        assert isinstance(engine, GraphedEngine) and not engine.enabled
        assert outputs_equal(engine(inputs[name]), model.engines[name](inputs[name]))
        assert not engine.graphs and engine.engine is model.engines[name]


def test_a_model_of_some_parts_is_graphed_as_it_is(tiny_root):
    """A Triton model loads only what it runs (the denoiser's CFG copy: the UNet alone)."""
    unet_only = graph_engines(load_model(tiny_root / "model", parts=("unet",)))
    assert set(unet_only.engines) == {"unet", "unet_encoder", "unet_decoder"}
    assert all(isinstance(engine, GraphedEngine) for engine in unet_only.engines.values())


def test_patch_and_restore_reach_the_shared_weights(tiny_root, cpu_models):
    model, graphed = cpu_models
    inputs = engine_inputs(model)["unet"]
    before = graphed.engines["unet"](inputs)["noise_pred"].clone()
    graphed.engines["unet_encoder"].patch(some_patch(tiny_root, model).patches["unet"])
    patched = graphed.engines["unet"](inputs)["noise_pred"]
    assert torch.equal(patched, model.engines["unet"](inputs)["noise_pred"])
    assert not torch.equal(patched, before)
    graphed.engines["unet_decoder"].restore()
    assert torch.equal(graphed.engines["unet"](inputs)["noise_pred"], before)


def test_cpu_pipeline_matches_eager_pipeline(tiny_root, pipeline, cpu_models):
    model = cpu_models[1]
    graphed = Pipeline(model, LocalControlNets(GraphedControlNetCatalog(tiny_root / "controlnets")),
                       LoraStore(tiny_root / "loras", model.lora_target, model.device, model.dtype))
    request = GenerationRequest("a red house", "blurry", seed=3, steps=3, height=64, width=64, lora_mode="sync",
                                controlnets=(ControlNetUse("canny", control_image(1), 1.0),),
                                loras=(LoraUse("style_peft", 0.7),))
    assert np.array_equal(graphed.generate(request).image, pipeline.generate(request).image)


def test_channels_last_keeps_outputs_and_lora_patching(tiny_root, cpu_models):
    model = cpu_models[0]
    inputs = engine_inputs(model)["unet"]
    patch = some_patch(tiny_root, model).patches["unet"]
    model.engines["unet"].patch(patch)
    expected = model.engines["unet"](inputs)["noise_pred"]
    model.engines["unet"].restore()
    other = graph_engines(load_model(tiny_root / "model"), channels_last=True)
    other.engines["unet"].patch(patch)
    assert torch.allclose(other.engines["unet"](inputs)["noise_pred"], expected, atol=1e-4)


@pytest.fixture(scope="module")
def cuda_loaded(tiny_root):
    """An eager and a graphed view of one fp32 tiny model on the GPU (shared weights)."""
    model = load_model(tiny_root / "model", device="cuda")
    return model, graph_engines(model)


@pytest.fixture
def cuda_models(cuda_loaded):
    yield from restored(cuda_loaded)


@cuda
def test_replay_matches_eager(cuda_models):
    model, graphed = cuda_models
    for size in (64, 96):  # two shape buckets, two graphs per engine
        inputs = engine_inputs(model, size=size)
        for name in GRAPHED:
            engine = graphed.engines[name]
            eager = model.engines[name](inputs[name])
            replayed = {k: v.clone() for k, v in engine(inputs[name]).items()}
            assert engine.key(inputs[name]) in engine.graphs and not engine.failures
            assert outputs_equal(replayed, engine(inputs[name]))  # a second replay
            for key in eager:
                torch.testing.assert_close(replayed[key], eager[key], rtol=1e-4, atol=1e-4)


@cuda
def test_replay_sees_in_place_patch_and_restore(tiny_root, cuda_models):
    model, graphed = cuda_models
    inputs = engine_inputs(model)["unet"]
    unet = graphed.engines["unet"]
    w0 = {name: p.clone() for name, p in unet.weights.params.items()}
    before = unet(inputs)["noise_pred"].clone()
    unet.patch(some_patch(tiny_root, model).patches["unet"])
    patched = unet(inputs)["noise_pred"].clone()
    torch.testing.assert_close(patched, model.engines["unet"](inputs)["noise_pred"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(patched, before, atol=1e-3)
    unet.restore()
    assert all(torch.equal(p, w0[name]) for name, p in unet.weights.params.items())
    torch.testing.assert_close(unet(inputs)["noise_pred"], before)
    assert not unet.failures


@cuda
def test_static_outputs_are_overwritten_unless_cloned(cuda_models):
    model, graphed = cuda_models
    first, second = engine_inputs(model, seed=1)["unet"], engine_inputs(model, seed=2)["unet"]
    unet = graphed.engines["unet"]
    held = unet(first)["noise_pred"]
    unet(second)
    # `held` is the static output tensor: the second replay wrote `second`'s result into it.
    torch.testing.assert_close(held, model.engines["unet"](second)["noise_pred"], rtol=1e-4, atol=1e-4)
    cloning = GraphedEngine(unet.engine, clone_outputs=True)
    kept = cloning(first)["noise_pred"]
    cloning(second)
    torch.testing.assert_close(kept, model.engines["unet"](first)["noise_pred"], rtol=1e-4, atol=1e-4)


@cuda
def test_graphed_pipeline_matches_eager_on_gpu(tiny_root, cuda_models):
    model, graphed = cuda_models

    def pipeline(loaded, catalog):
        return Pipeline(loaded, LocalControlNets(catalog(tiny_root / "controlnets", "cuda")),
                        LoraStore(tiny_root / "loras", loaded.lora_target, loaded.device, loaded.dtype))

    eager, replayed = pipeline(model, ControlNetCatalog), pipeline(graphed, GraphedControlNetCatalog)
    canny = ControlNetUse("canny", control_image(1), 1.0)
    for request in (GenerationRequest("a house", seed=5, steps=4, height=64, width=64, controlnets=(canny, canny)),
                    GenerationRequest("a house", seed=5, steps=4, height=64, width=64, lora_mode="sync",
                                      loras=(LoraUse("character_kohya", 0.8),))):
        assert max_diff(replayed.generate(request).image, eager.generate(request).image) <= 1
