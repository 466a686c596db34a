"""`swiftdiffusion serve` configured from the environment (what the Kubernetes manifests do), and a deployment
without the streaming model."""

from __future__ import annotations

from swiftdiffusion import serve
from swiftdiffusion.triton.repository import Deployment, render_configs


def parse(argv: list[str], environ: dict[str, str]):
    parser = serve.parser()
    return parser.parse_args(serve.with_environment(parser, argv, environ))


def test_environment_variables_set_flags_and_the_command_line_wins(tiny_root):
    environ = {"SWIFTDIFFUSION_MODEL": str(tiny_root / "model"), "SWIFTDIFFUSION_MAX_QUEUE": "3",
               "SWIFTDIFFUSION_CONTROLNET_GPUS": "1, 2 3", "SWIFTDIFFUSION_NO_STREAM": "true",
               "SWIFTDIFFUSION_COMPILE": "0", "UNRELATED": "x", "SWIFTDIFFUSION_HELP": "1"}
    args = parse(["--max-queue", "5"], environ)
    assert (args.model, args.max_queue, args.controlnet_gpus) == (tiny_root / "model", 5, [1, 2, 3])
    assert args.no_stream is True and args.compile is False
    assert parse([], {}).max_queue == Deployment.max_queue and parse([], {}).no_stream is False


def test_a_deployment_without_streaming_renders_no_streaming_model(tiny_root):
    common = dict(model=tiny_root / "model", controlnet_catalog=tiny_root / "controlnets",
                  lora_catalog=str(tiny_root / "loras"))
    assert "text_to_image_stream" in render_configs(Deployment(**common))
    assert set(render_configs(Deployment(**common))) - set(render_configs(Deployment(**common, streaming=False))) \
        == {"text_to_image_stream"}
