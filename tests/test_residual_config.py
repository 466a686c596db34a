"""How a deployment says where ControlNet residuals go (issue 14, part 3), without a server: the rendered configs of
the `host` and `dlpack` transports and of the `local` placement, and `serve`'s flags against a device check's
verdict (the flags win). The servers themselves: test_dlpack_transport.py, test_local_placement.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swiftdiffusion import serve
from swiftdiffusion.triton.repository import Deployment, render_configs, write_repository

GPU_VERDICT = {"gpu": True, "residual_path": "dlpack", "host_path_works": True, "checked_at": "2026-12-03",
               "device": "NVIDIA H200", "settings": {"libcuda_link": True, "cuda_memory_pool_byte_size": 1 << 30,
                                                     "shm_default_byte_size": 256 << 20}}


def deployment(root: Path, **fields) -> Deployment:
    return Deployment(model=root / "model", controlnet_catalog=root / "controlnets", lora_catalog=str(root / "loras"),
                      **fields)


def parameters(config: str) -> dict[str, str]:
    """A config.pbtxt's parameters."""
    return dict(line.split('"')[1::2] for line in config.splitlines() if line.startswith("parameters {"))


def tensor_types(config: str) -> dict[str, str]:
    """Each input's and output's data type, by name."""
    blocks = config.split("{\n    name: ")[1:]
    return {block.split('"')[1]: block.split("data_type: ")[1].split()[0] for block in blocks}


def test_a_cpu_deployment_carries_residuals_through_host_memory_to_the_controlnet_model(tiny_root):
    configs = render_configs(deployment(tiny_root))
    assert "controlnet" in configs
    for model in ("denoiser", "text_to_image_stream"):
        assert {k: v for k, v in parameters(configs[model]).items() if k in (
            "controlnet_placement", "residual_transport", "controlnet_model")} == {
            "controlnet_placement": "service", "residual_transport": "host", "controlnet_model": "controlnet"}
    controlnet = parameters(configs["controlnet"])
    assert controlnet["residual_transport"] == "host" and "FORCE_CPU_ONLY_INPUT_TENSORS" not in controlnet


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dlpack_lets_the_controlnet_model_see_gpu_inputs(family_roots, family):
    configs = render_configs(deployment(family_roots[family], residual_transport="dlpack"))
    controlnet = parameters(configs["controlnet"])
    assert controlnet["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no" and controlnet["residual_transport"] == "dlpack"
    assert parameters(configs["denoiser"])["residual_transport"] == "dlpack"
    assert parameters(configs["text_to_image_stream"])["residual_transport"] == "dlpack"
    names = set(tensor_types(configs["controlnet"]))
    assert ({"text_embeds", "time_ids"} <= names) == (family == "sdxl") and {"sample", "controlnet_cond"} <= names


def test_controlnet_tensors_take_the_deployments_dtype_and_the_timestep_stays_fp32(tiny_xl_root):
    types = tensor_types(render_configs(deployment(tiny_xl_root, dtype="float16"))["controlnet"])
    assert types.pop("controlnet_name") == "TYPE_STRING" and types.pop("timestep") == "TYPE_FP32"
    assert {"sample", "encoder_hidden_states", "text_embeds", "time_ids", "controlnet_cond", "mid"} <= set(types)
    assert set(types.values()) == {"TYPE_FP16"}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tensors_between_the_models_are_of_the_deployments_dtype_at_both_ends(tiny_xl_root, dtype):
    """Triton refuses a tensor whose type is not its input's ("inference input 'encoder_hidden_states' data-type is
    'FP16', but model 'denoiser' expects 'FP32'", as an fp16 deployment's ensemble once answered)."""
    expected = {"float16": "TYPE_FP16", "float32": "TYPE_FP32"}[dtype]
    configs = render_configs(deployment(tiny_xl_root, dtype=dtype))
    types = {model: tensor_types(configs[model]) for model in ("text_encoder", "denoiser", "vae_decoder")}
    for producer, consumer, name in [("text_encoder", "denoiser", "encoder_hidden_states"),
                                     ("text_encoder", "denoiser", "text_embeds"),
                                     ("denoiser", "vae_decoder", "latents")]:
        assert types[producer][name] == types[consumer][name] == expected, (producer, consumer, name)


@pytest.mark.parametrize(("fields", "devices"), [
    ({"controlnet_instances": 2}, "cpu,cpu"),
    ({"gpus": {"denoiser": [[0]], "controlnet": [[1], [2]]}}, "cuda:1,cuda:2"),
])
def test_the_local_placement_renders_no_controlnet_model(tiny_root, tmp_path, fields, devices):
    write_repository(tmp_path, deployment(tiny_root))
    assert (tmp_path / "controlnet" / "config.pbtxt").is_file()
    configs = render_configs(deployment(tiny_root, controlnet_placement="local", **fields))
    assert "controlnet" not in configs
    for model in ("denoiser", "text_to_image_stream"):
        params = parameters(configs[model])
        assert (params["controlnet_placement"], params["controlnet_devices"]) == ("local", devices)
        assert "controlnet_model" not in params and "residual_transport" not in params
    write_repository(tmp_path, deployment(tiny_root, controlnet_placement="local", **fields))
    assert not (tmp_path / "controlnet").exists()  # an earlier deployment's model would load too


@pytest.mark.parametrize(("fields", "message"), [
    ({"residual_transport": "ipc"}, "residual_transport must be one of ('host', 'dlpack'), not 'ipc'"),
    ({"controlnet_placement": "remote"}, "controlnet_placement must be one of ('service', 'local'), not 'remote'"),
    ({"controlnet_placement": "local", "residual_transport": "dlpack"}, "applies to the service placement only"),
])
def test_unknown_or_contradicting_choices_are_refused(tiny_root, fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deployment(tiny_root, **fields)


def served(tiny_root: Path, tmp_path: Path, *flags: str, verdict: dict | None = None) -> tuple[str, str]:
    """`swiftdiffusion serve --write-only` with these flags (and a device check's JSON): the rendered deployment's
    (residual_transport, controlnet_placement)."""
    args = ["--model", str(tiny_root / "model"), "--controlnets", str(tiny_root / "controlnets"), "--loras",
            str(tiny_root / "loras"), "--repository", str(tmp_path / "repository"), "--write-only", *flags]
    if verdict is not None:
        (tmp_path / "check.json").write_text(json.dumps({"verdict": verdict}))
        args += ["--gpu-check", str(tmp_path / "check.json")]
    assert serve.main(args) == 0
    rendered = json.loads((tmp_path / "repository" / "deployment.json").read_text())
    return rendered["residual_transport"], rendered["controlnet_placement"]


CUDA = ("--device", "cuda", "--controlnet-gpus", "1")


@pytest.mark.parametrize(("flags", "verdict", "expected"), [
    ((), None, ("host", "service")),
    (CUDA, None, ("host", "service")),
    (CUDA, GPU_VERDICT, ("dlpack", "service")),
    (CUDA, {**GPU_VERDICT, "residual_path": "local"}, ("host", "local")),
    (CUDA, {**GPU_VERDICT, "residual_path": "host"}, ("host", "service")),
    # A check run without a GPU established nothing about GPU paths, and a CPU deployment takes none of them.
    (CUDA, {"gpu": False, "residual_path": "host", "settings": None}, ("host", "service")),
    ((), GPU_VERDICT, ("host", "service")),
    # Explicit flags win over the verdict.
    ((*CUDA, "--residual-transport", "host"), GPU_VERDICT, ("host", "service")),
    ((*CUDA, "--controlnet-placement", "local"), GPU_VERDICT, ("host", "local")),
    ((*CUDA, "--controlnet-placement", "service"), {**GPU_VERDICT, "residual_path": "local"}, ("host", "service")),
    (("--residual-transport", "dlpack"), None, ("dlpack", "service")),
    (("--controlnet-placement", "local"), None, ("host", "local")),
])
def test_serve_takes_the_route_from_its_flags_then_the_device_check(tiny_root, tmp_path, flags, verdict, expected):
    assert served(tiny_root, tmp_path, *flags, verdict=verdict) == expected


def test_serve_refuses_contradicting_flags(tiny_root, tmp_path):
    with pytest.raises(SystemExit, match="residual_transport applies to the service placement only"):
        served(tiny_root, tmp_path, "--controlnet-placement", "local", "--residual-transport", "dlpack")
