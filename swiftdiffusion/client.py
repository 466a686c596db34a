"""gRPC client for `text_to_image` and its streaming twin `text_to_image_stream`.

    client = Client("127.0.0.1:8001")
    image = client.generate(GenerationRequest("a red house", loras=(LoraUse("style_peft", 0.8),))).image

Errors come back as `InferenceServerException` with Triton's status (INVALID_ARG for a bad field) and the
server's message, which names the field.
"""

from __future__ import annotations

import dataclasses
import queue
from typing import Callable, Iterator

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .request import GenerationRequest
from .schema import tensors_from_request

MODEL = "text_to_image"
STREAM_MODEL = "text_to_image_stream"


@dataclasses.dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    elapsed_s: float


@dataclasses.dataclass(frozen=True)
class Generated:
    image: np.ndarray  # uint8 [height, width, 3]
    lora_step: int


def lora_step_of(result) -> int:
    """The `lora_step` output of an inference result."""
    return int(result.as_numpy("lora_step").reshape(-1)[0])


def infer_inputs(tensors: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in tensors.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class Client:
    def __init__(self, url: str = "127.0.0.1:8001", timeout_s: float | None = None):
        self.url = url
        self.timeout_s = timeout_s
        self.grpc = grpcclient.InferenceServerClient(url)

    def generate(self, request: GenerationRequest, model: str = MODEL) -> Generated:
        """One unary request; raises InferenceServerException on error."""
        result = self.grpc.infer(model, infer_inputs(tensors_from_request(request)),
                                 outputs=[grpcclient.InferRequestedOutput("image"),
                                          grpcclient.InferRequestedOutput("lora_step")],
                                 client_timeout=self.timeout_s)
        return Generated(result.as_numpy("image")[0], lora_step_of(result))

    def stream(self, request: GenerationRequest) -> Iterator[Progress | Generated]:
        """Yields a Progress per step, then the Generated image; raises InferenceServerException on error."""
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            client.async_stream_infer(STREAM_MODEL, infer_inputs(tensors_from_request(request)),
                                      enable_empty_final_response=True)
            while True:
                result, error = responses.get(timeout=self.timeout_s)
                if error is not None:
                    raise error
                final = result.get_response().parameters.get("triton_final_response")
                if result.as_numpy("image") is not None:
                    yield Generated(result.as_numpy("image")[0], lora_step_of(result))
                elif result.as_numpy("step") is not None:
                    yield Progress(int(result.as_numpy("step").reshape(-1)[0]),
                                   int(result.as_numpy("total_steps").reshape(-1)[0]),
                                   float(result.as_numpy("elapsed_s").reshape(-1)[0]))
                if final is not None and final.bool_param:
                    return
        finally:
            client.stop_stream()
            client.close()

    def generate_streaming(self, request: GenerationRequest,
                           on_progress: Callable[[Progress], None] | None = None) -> Generated:
        generated = None
        for message in self.stream(request):
            if isinstance(message, Progress):
                if on_progress is not None:
                    on_progress(message)
            else:
                generated = message
        if generated is None:
            raise InferenceServerException("the stream ended without an image")
        return generated

    def close(self) -> None:
        self.grpc.close()
