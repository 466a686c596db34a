"""Triton Python model `lora_prefetch`: the ensemble's look-ahead, starting a request's LoRA fetches at arrival.

A thin adapter: the logic is `swiftdiffusion.triton.prefetch.LoraPrefetchModel`; its config.pbtxt is generated
by `swiftdiffusion.triton.repository`.
"""

import triton_python_backend_utils as pb_utils

from swiftdiffusion.triton.prefetch import LoraPrefetchModel


class TritonPythonModel(LoraPrefetchModel):
    pb = pb_utils
