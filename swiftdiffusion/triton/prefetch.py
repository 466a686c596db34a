"""The ensemble's look-ahead step, `lora_prefetch`: a request's LoRA files start coming as it arrives.

It runs right after the text encoder, long before the request's turn at a busy denoiser: remote files are copied
into the local copies the denoisers read (`lora_source.FileCopies`), local ones are read ahead into the page
cache. It only starts the work and answers at once, so it never delays its request; a bad name, or a fetch
that fails, is the denoiser's to report. It imports no torch: its process stays small and starts fast.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..lora_source import LoraSource
from ..request import CATALOG_NAME

# Its output: how many files it started fetching. The denoiser takes it (and ignores it) so that the ensemble
# runs this step; Triton wants every step's outputs wired somewhere.
PREFETCHED = "loras_prefetched"


class LoraPrefetchModel:
    pb: Any = None  # triton_python_backend_utils, bound by model.py

    def initialize(self, args: dict) -> None:
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.source = LoraSource(params["lora_catalog"], params.get("lora_copies") or None)
        instance = args.get("model_instance_name", "lora_prefetch")
        print(f"swiftdiffusion: {instance} ready on cpu: look-ahead for the LoRAs of {params['lora_catalog']}",
              flush=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = self.pb.get_input_tensor_by_name(request, "lora_names")
            names = [] if tensor is None else [_name(item) for item in tensor.as_numpy().reshape(-1)]
            names = [name for name in names if name is not None and CATALOG_NAME.fullmatch(name)]
            self.source.prefetch(names)
            responses.append(self.pb.InferenceResponse([self.pb.Tensor(PREFETCHED,
                                                                       np.array([[len(names)]], np.int32))]))
        return responses


def _name(item) -> str | None:
    try:
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        return None
