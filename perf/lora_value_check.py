"""What refusing non-finite or absurd LoRA values costs: `check_values` on an SD1.5-width rank-64 LoRA.

    python perf/lora_value_check.py --out perf/results/lora_value_check.json

A kohya file (UNet + text encoder, SD1.5's widths, rank 64, fp32 on disk: 127 MB) is decoded by `LoraStore.load` with
the check and, interleaved in the same run, with it replaced by a no-op; and the check alone is timed on the
decoded factors. The model's shapes come from meta-device modules (no weights are built).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from measuring import seconds
from swiftdiffusion import family, lora, tiny
from swiftdiffusion.lora_store import LoraStore
from swiftdiffusion.request import LoraUse

SD15 = tiny.ModelSize(unet_channels=(320, 640, 1280, 1280), norm_groups=32, text_widths=(768,), text_layers=(12,),
                      vae_channels=(128, 256, 512, 512), vae_layers=2, controlnet_embedding=(16, 32, 96, 256),
                      lora_rank=64)


def sd15_modules() -> tuple[torch.nn.Module, torch.nn.Module]:
    with torch.device("meta"):
        unet = tiny.build_unet(SD15)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, max_position_embeddings=tiny.TEXT_LENGTH))
    return unet, text_encoder


def write_lora(path: Path, unet, text_encoder, rank: int, dtype: torch.dtype) -> None:
    targets = tiny.model_lora_targets({"unet": unet, "text_encoder": text_encoder})
    state = tiny.random_lora(targets, rank, torch.Generator().manual_seed(0), "kohya", rank / 2)
    save_file({k: v.to(dtype) for k, v in state.items()}, path)


def lora_target(unet, text_encoder) -> lora.LoraTarget:
    return lora.LoraTarget(family.SD15, unet.config, {"unet": lora.weight_shapes(unet),
                                                      "text_encoder": lora.weight_shapes(text_encoder)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--file-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    unet, text_encoder = sd15_modules()
    shapes = lora_target(unet, text_encoder)
    with tempfile.TemporaryDirectory() as folder:
        write_lora(Path(folder) / "sd15.safetensors", unet, text_encoder, args.rank, getattr(torch, args.file_dtype))
        size = (Path(folder) / "sd15.safetensors").stat().st_size
        store = LoraStore(folder, shapes, torch.device("cpu"), torch.float16)
        use = [LoraUse("sd15")]
        store.load(use)  # first use: imports, allocator
        with_check, without_check = [], []
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            with_check.append(seconds(lambda: store.load(use)))
            with mock.patch.object(lora, "check_values", lambda *a: None):
                without_check.append(seconds(lambda: store.load(use)))
        decoded = lora.decode_lora("sd15", lora.read_lora("sd15", Path(folder) / "sd15.safetensors"), shapes)
        check_s = statistics.median(seconds(lambda: [lora.check_values("sd15", c, f) for c, f in decoded.layers.items()])
                                    for _ in range(args.runs))
    factor_bytes = sum(t.numel() * t.element_size() for f in decoded.layers.values() for pair in f.values()
                       for t in pair)
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
        "lora": {"rank": args.rank, "file_dtype": args.file_dtype, "file_mb": size / 1e6, "decoded_fp32_factor_mb": factor_bytes / 1e6,
                 "layers": sum(len(f) for f in decoded.layers.values())},
        "load_with_check_s": statistics.median(with_check), "load_without_check_s": statistics.median(without_check),
        "check_alone_s": check_s,
    }
    result["check_share_of_load"] = result["check_alone_s"] / result["load_with_check_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
