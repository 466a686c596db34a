"""SDXL as a model family, in-process: the tiny SDXL folder is what a real one is, the graphs split it where the
ControlNet boundary is, LoRA files of SDXL's layouts decode as diffusers decodes them and foreign ones are refused,
and a ControlNet or LoRA of the other family never reaches the weights."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_pipeline
from swiftdiffusion import tiny
from swiftdiffusion.family import SDXL, family_of
from swiftdiffusion.graphs import graph_specs, residual_names
from swiftdiffusion.lora import decode_lora, read_lora
from swiftdiffusion.models import load_components
from swiftdiffusion.request import ControlNetUse, GenerationRequest, LoraUse, RequestError
from swiftdiffusion.schedulers import find_scheduler
from test_fidelity import CASES


def test_sdxl_tiny_folder_is_an_sdxl_folder(tiny_xl_root):
    model = tiny_xl_root / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = json.loads((model / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["use_linear_projection"]
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert len(set(unet["transformer_layers_per_block"])) > 1  # depth per level
    components = load_components(model)
    assert components.family is SDXL and family_of(unet) is SDXL
    assert components.tokenizer_2.pad_token == "!" and components.tokenizer.pad_token == "<|endoftext|>"
    assert unet["cross_attention_dim"] == components.text_encoder.config.hidden_size + \
        components.text_encoder_2.config.hidden_size
    assert json.loads((model / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"
    assert json.loads((model / "vae" / "config.json").read_text())["force_upcast"] is True
    assert family_of(json.loads((tiny_xl_root / "controlnets" / "canny" / "config.json").read_text())) is SDXL


def test_sdxl_tiny_build_is_deterministic(tiny_xl_root, tmp_path):
    again = tiny.build_model(tmp_path, "tiny", seed=0, family="sdxl")
    for relative in ("model/unet/diffusion_pytorch_model.safetensors", "model/text_encoder_2/model.safetensors",
                     "controlnets/depth/diffusion_pytorch_model.safetensors", "loras/character_kohya.safetensors"):
        assert (again / relative).read_bytes() == (tiny_xl_root / relative).read_bytes(), relative


def test_sdxl_tiny_loras_have_their_formats_layouts(tiny_xl_root):
    kohya = load_file(tiny_xl_root / "loras" / "character_kohya.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0") for k in kohya)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in kohya)
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in kohya)
    assert any(k.endswith("in_layers_2.lora_down.weight") and kohya[k].shape[2:] == (3, 3) for k in kohya)  # LoCon
    assert {k.split("_")[1] for k in kohya if k.startswith("lora_te")} == {"te1", "te2"}
    ranks = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert ranks == {tiny.SIZES["sdxl"]["tiny"].lora_rank / 2}  # alpha != rank
    for name in ("style_peft", "style_diffusers"):
        keys = load_file(tiny_xl_root / "loras" / f"{name}.safetensors")
        assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}, name
    ups = [v for k, v in kohya.items() if "lora_up" in k]
    assert all(float(up.abs().max()) > 0 for up in ups)


def test_sdxl_graphs_split_three_levels_into_nine_skips_and_mid(tiny_xl_root):
    config = json.loads((tiny_xl_root / "model" / "unet" / "config.json").read_text())
    specs = graph_specs(config)
    assert residual_names(specs["unet_decoder"]) == (*(f"down_{i}" for i in range(9)), "mid")
    assert specs["unet_encoder"].inputs == ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    assert specs["controlnet"].inputs[-3:] == ("text_embeds", "time_ids", "controlnet_cond")
    assert specs["text_encoder_2"].outputs == ("hidden_states", "text_embeds")
    assert specs["unet_decoder"].inputs[-1] == "encoder_hidden_states"  # added conditioning is the encoder's only


def test_sdxl_encoder_then_decoder_equals_the_full_unet(xl_pipeline):
    model = xl_pipeline.model
    generator = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 12, 8, generator=generator), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(2, 77, model.unet_config["cross_attention_dim"], generator=generator),
              "text_embeds": torch.randn(2, 64, generator=generator),
              "time_ids": torch.tensor([[96.0, 64.0, 0.0, 0.0, 96.0, 64.0]] * 2)}
    hidden = model.engines["unet_encoder"](inputs)
    decoded = model.engines["unet_decoder"]({**hidden, "encoder_hidden_states": inputs["encoder_hidden_states"]})
    full = model.engines["unet"](inputs)
    torch.testing.assert_close(decoded["noise_pred"], full["noise_pred"], rtol=0, atol=1e-5)


def test_sdxl_kohya_with_diffusers_block_names_decodes_like_sgm_names(tiny_xl_root, xl_pipeline, tmp_path):
    """kohya's SDXL trainers write sgm block names, some tools diffusers ones: the same factors either way."""
    sgm = load_file(tiny_xl_root / "loras" / "character_kohya.safetensors")
    diffusers_named = {}
    modules = dict(xl_pipeline.model.engines["unet"].weights.params)
    by_sgm = {tiny.sgm_name(name.removesuffix(".weight"), 2).replace(".", "_"): name.removesuffix(".weight")
              for name in modules if name.endswith(".weight") and ("attentions" in name or "resnets" in name)}
    for key, value in sgm.items():
        head, _, tail = key.partition(".")
        if head.startswith("lora_unet_"):
            head = "lora_unet_" + by_sgm[head.removeprefix("lora_unet_")].replace(".", "_")
        diffusers_named[f"{head}.{tail}"] = value
    save_file(diffusers_named, tmp_path / "kohya_diffusers_names.safetensors")
    target = xl_pipeline.model.lora_target
    ours = decode_lora("a", read_lora("a", tmp_path / "kohya_diffusers_names.safetensors"), target)
    theirs = decode_lora("b", read_lora("b", tiny_xl_root / "loras" / "character_kohya.safetensors"), target)
    assert ours.layers.keys() == theirs.layers.keys() == {"unet", "text_encoder", "text_encoder_2"}
    for component in ours.layers:
        assert ours.layers[component].keys() == theirs.layers[component].keys()
        for weight, (down, up) in ours.layers[component].items():
            assert torch.equal(down, theirs.layers[component][weight][0])
            assert torch.equal(up, theirs.layers[component][weight][1])


@pytest.fixture(scope="module")
def foreign_catalogs(tiny_root, tiny_xl_root, tmp_path_factory):
    """An SDXL catalog holding an SD1.5 ControlNet and LoRA, LoHa and LoKr files, beside its own."""
    root = tmp_path_factory.mktemp("foreign")
    shutil.copytree(tiny_xl_root / "controlnets", root / "controlnets")
    shutil.copytree(tiny_root / "controlnets" / "canny", root / "controlnets" / "sd15_canny")
    shutil.copytree(tiny_xl_root / "loras", root / "loras")
    shutil.copy(tiny_root / "loras" / "character_kohya.safetensors", root / "loras" / "sd15_kohya.safetensors")
    layer = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    generator = torch.Generator().manual_seed(0)
    save_file({f"{layer}.hada_w1_a": torch.randn(64, 4, generator=generator),
               f"{layer}.hada_w1_b": torch.randn(4, 64, generator=generator),
               f"{layer}.hada_w2_a": torch.randn(64, 4, generator=generator),
               f"{layer}.hada_w2_b": torch.randn(4, 64, generator=generator), f"{layer}.alpha": torch.tensor(4.0)},
              root / "loras" / "loha.safetensors")
    save_file({f"{layer}.lokr_w1": torch.randn(8, 8, generator=generator),
               f"{layer}.lokr_w2": torch.randn(8, 8, generator=generator), f"{layer}.alpha": torch.tensor(4.0)},
              root / "loras" / "lokr.safetensors")
    model = tiny_xl_root / "model"
    (root / "model").symlink_to(model)
    return root


@pytest.mark.parametrize("addon, field, message", [
    (dict(controlnets=(ControlNetUse("sd15_canny", np.zeros((64, 64, 3), np.uint8)),)), "controlnet_names",
     "is an sd15 ControlNet; this model is sdxl"),
    (dict(loras=(LoraUse("sd15_kohya"),)), "lora_names", "this model lacks"),
    (dict(loras=(LoraUse("loha"),)), "lora_names", "not a readable LoRA"),
    (dict(loras=(LoraUse("lokr"),)), "lora_names", "not a readable LoRA"),
])
def test_sdxl_foreign_addons_are_request_errors_and_weights_stay_pristine(foreign_catalogs, addon, field, message):
    pipeline = make_pipeline(foreign_catalogs)
    pristine = {n: p.clone() for n, p in pipeline.model.engines["unet"].weights.params.items()}
    plain = pipeline.generate(CASES["no_addons"]).image
    for mode in ("sync", "bounded"):
        with pytest.raises(RequestError, match=message) as raised:
            pipeline.generate(dataclasses.replace(CASES["no_addons"], lora_mode=mode, **addon))
        assert raised.value.field == field
    assert all(torch.equal(p, pristine[n]) for n, p in pipeline.model.engines["unet"].weights.params.items())
    assert np.array_equal(pipeline.generate(CASES["no_addons"]).image, plain)


def test_sdxl_lora_on_an_sd15_model_names_the_missing_text_encoder(pipeline, tiny_xl_root, tmp_path):
    shutil.copy(tiny_xl_root / "loras" / "style_peft.safetensors", tmp_path / "xl_peft.safetensors")
    with pytest.raises(Exception, match="adapts text_encoder_2, which this sd15 model does not have"):
        decode_lora("xl_peft", read_lora("xl_peft", tmp_path / "xl_peft.safetensors"), pipeline.model.lora_target)


def test_sdxl_request_defaults_are_the_models(xl_pipeline):
    request = xl_pipeline.check(GenerationRequest("a cat"))
    assert (request.height, request.width, request.guidance_scale, request.scheduler) == (1024, 1024, 5.0, None)
    assert xl_pipeline.model.family.default_guidance == 5.0
    with_image = xl_pipeline.check(GenerationRequest("a cat", controlnets=(
        ControlNetUse("canny", np.zeros((64, 96, 3), np.uint8)),)))
    assert (with_image.height, with_image.width) == (64, 96)


def test_sdxl_fields_are_refused_by_an_sd15_model(pipeline):
    for field, value in (("prompt_2", "x"), ("negative_prompt_2", "x"), ("original_size", (64, 64)),
                         ("crops_coords_top_left", (0, 0)), ("target_size", (64, 64))):
        with pytest.raises(RequestError, match=f"this model \\(sd15\\) does not take {field}") as raised:
            pipeline.check(dataclasses.replace(CASES["no_addons"], **{field: value}))
        assert raised.value.field == field


def test_scheduler_names_resolve_case_and_spacing_insensitively():
    assert find_scheduler("DPM++ 2M Karras").name == "dpmpp_2m_karras"
    assert find_scheduler("  dpm++   sde  karras ").name == "dpmpp_sde_karras"
    assert find_scheduler("Euler a").name == find_scheduler("euler_a").name == "euler_a"
    assert find_scheduler("LCM").sampler.scheduler == "LCMScheduler"
    assert find_scheduler("euler_a_karras") is None  # EulerAncestral has no sigma schedules in diffusers


def test_sampler_sigma_schedules_are_the_ones_diffusers_offers():
    import inspect

    import diffusers

    from swiftdiffusion.schedulers import SAMPLERS, SIGMA_SCHEDULES
    for sampler in SAMPLERS:
        parameters = inspect.signature(getattr(diffusers, sampler.scheduler).__init__).parameters
        assert sampler.sigma_schedules == all(flag in parameters for flag in SIGMA_SCHEDULES.values()), sampler.name
