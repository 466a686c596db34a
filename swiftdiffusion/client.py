"""gRPC client for `text_to_image` and its streaming twin `text_to_image_stream`.

    client = Client("127.0.0.1:8001")
    image = client.generate(GenerationRequest("a red house", loras=(LoraUse("style_peft", 0.8),))).image

Errors come back as `InferenceServerException` with Triton's status (INVALID_ARG for a bad field) and the
server's message, which names the field. A client with `timeout_s` sends it with each request, so the server
stops working on a request once its client has stopped waiting; with `retries`, a request refused because the
server is at capacity (UNAVAILABLE) is sent again after an exponential, jittered backoff.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import time
from typing import Callable, Iterator, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .request import GenerationRequest
from .schema import tensors_from_request

MODEL = "text_to_image"
STREAM_MODEL = "text_to_image_stream"
RETRYABLE = "StatusCode.UNAVAILABLE"  # the server's queue is full (or it is not ready yet)
T = TypeVar("T")


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


def with_retries(call: Callable[[], T], retries: int, backoff_s: float = 0.5, max_backoff_s: float = 8.0) -> T:
    """`call()`, sent again up to `retries` times while the server answers UNAVAILABLE; waits grow 2x from
    `backoff_s` (full jitter, so refused clients do not come back in step)."""
    for attempt in range(retries + 1):
        try:
            return call()
        except InferenceServerException as error:
            if error.status() != RETRYABLE or attempt == retries:
                raise
            time.sleep(random.uniform(0, min(max_backoff_s, backoff_s * 2 ** attempt)))
    raise AssertionError("unreachable")


class Client:
    def __init__(self, url: str = "127.0.0.1:8001", timeout_s: float | None = None, retries: int = 0):
        """`timeout_s`: how long to wait for each request (its gRPC deadline, and the server's budget for it
        unless the request sets its own); `retries`: how often to resend a request refused with UNAVAILABLE."""
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.grpc = grpcclient.InferenceServerClient(url)

    def budgeted(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the client's timeout as its time budget, unless it has one."""
        if request.timeout_s is None and self.timeout_s is not None:
            return dataclasses.replace(request, timeout_s=self.timeout_s)
        return request

    def generate(self, request: GenerationRequest, model: str = MODEL) -> Generated:
        """One unary request; raises InferenceServerException on error."""
        request = self.budgeted(request)
        inputs = infer_inputs(tensors_from_request(request))
        outputs = [grpcclient.InferRequestedOutput("image"), grpcclient.InferRequestedOutput("lora_step")]
        result = with_retries(lambda: self.grpc.infer(model, inputs, outputs=outputs,
                                                      client_timeout=request.timeout_s), self.retries)
        return Generated(result.as_numpy("image")[0], lora_step_of(result))

    def stream(self, request: GenerationRequest) -> Iterator[Progress | Generated]:
        """Yields a Progress per step, then the Generated image; raises InferenceServerException on error.

        Closing the generator early closes the stream, and the server stops the request at its next step.
        """
        request = self.budgeted(request)
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            client.async_stream_infer(STREAM_MODEL, infer_inputs(tensors_from_request(request)),
                                      enable_empty_final_response=True)
            while True:
                result, error = responses.get(timeout=request.timeout_s)
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
            client.stop_stream(cancel_requests=True)
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
