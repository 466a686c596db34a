"""gRPC clients for `text_to_image` and its streaming twin `text_to_image_stream`: `Client` (blocking) and
`AsyncClient` (asyncio, for many concurrent requests from one thread), with the same methods.

    client = Client("127.0.0.1:8001")
    image = client.generate(GenerationRequest("a red house", loras=(LoraUse("style_peft", 0.8),))).image

    async with AsyncClient("127.0.0.1:8001") as client:
        images = await asyncio.gather(*(client.generate(r) for r in requests))

Errors come back as `InferenceServerException` with Triton's status (INVALID_ARG for a bad field) and the
server's message, which names the field. A client with `timeout_s` sends it with each request, so the server
stops working on a request once its client has stopped waiting; with `retries`, a request refused because the
server is at capacity (UNAVAILABLE) is sent again after an exponential, jittered backoff. Every request carries
its LoRA set's key as gRPC metadata (`swiftdiffusion.routing`), on which a LoRA-affinity proxy routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import random
import time
from typing import AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .request import GenerationRequest
from .routing import routing_headers
from .schema import IMAGE_OUTPUT, LORA_STEP_OUTPUT, tensors_from_request

MODEL = "text_to_image"
STREAM_MODEL = "text_to_image_stream"
RETRYABLE = "StatusCode.UNAVAILABLE"  # the server's queue is full (or it is not ready yet)
FINAL = {"triton_enable_empty_final_response": True}  # the stream's last response says it is the last
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
    return int(result.as_numpy(LORA_STEP_OUTPUT.name).reshape(-1)[0])


def infer_inputs(tensors: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in tensors.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


OUTPUTS = [grpcclient.InferRequestedOutput(IMAGE_OUTPUT.name), grpcclient.InferRequestedOutput(LORA_STEP_OUTPUT.name)]


def generated(result) -> Generated:
    return Generated(result.as_numpy(IMAGE_OUTPUT.name)[0], lora_step_of(result))


def stream_message(result) -> Progress | Generated | None:
    """A streamed response: a step's progress, the image, or None (the empty final response)."""
    if result.as_numpy(IMAGE_OUTPUT.name) is not None:
        return generated(result)
    if result.as_numpy("step") is not None:
        return Progress(int(result.as_numpy("step").reshape(-1)[0]), int(result.as_numpy("total_steps").reshape(-1)[0]),
                        float(result.as_numpy("elapsed_s").reshape(-1)[0]))
    return None


def stream_step(result, error) -> tuple[Progress | Generated | None, bool]:
    """One streamed response: (its message, whether it was the stream's last); raises the stream's error."""
    if error is not None:
        raise error
    final = result.get_response().parameters.get("triton_final_response")
    return stream_message(result), final is not None and final.bool_param


def backoff_s(attempt: int, first_s: float = 0.5, max_s: float = 8.0) -> float:
    """The wait before retry `attempt` (0-based): doubling from `first_s`, full jitter, so refused clients do
    not come back in step."""
    return random.uniform(0, min(max_s, first_s * 2 ** attempt))


def retryable(error: InferenceServerException, attempt: int, retries: int) -> bool:
    return error.status() == RETRYABLE and attempt < retries


def with_retries(call: Callable[[], T], retries: int) -> T:
    """`call()`, sent again up to `retries` times while the server answers UNAVAILABLE."""
    for attempt in range(retries + 1):
        try:
            return call()
        except InferenceServerException as error:
            if not retryable(error, attempt, retries):
                raise
            time.sleep(backoff_s(attempt))
    raise AssertionError("unreachable")


async def with_retries_async(call: Callable[[], Awaitable[T]], retries: int) -> T:
    """`with_retries` for coroutines."""
    for attempt in range(retries + 1):
        try:
            return await call()
        except InferenceServerException as error:
            if not retryable(error, attempt, retries):
                raise
            await asyncio.sleep(backoff_s(attempt))
    raise AssertionError("unreachable")


def budgeted(request: GenerationRequest, timeout_s: float | None) -> GenerationRequest:
    """The request with the client's timeout as its time budget, unless it has one."""
    if request.timeout_s is None and timeout_s is not None:
        return dataclasses.replace(request, timeout_s=timeout_s)
    return request


class Client:
    def __init__(self, url: str = "127.0.0.1:8001", timeout_s: float | None = None, retries: int = 0):
        """`timeout_s`: how long to wait for each request (its gRPC deadline, and the server's budget for it
        unless the request sets its own); `retries`: how often to resend a request refused with UNAVAILABLE."""
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.grpc = grpcclient.InferenceServerClient(url)

    def generate(self, request: GenerationRequest, model: str = MODEL) -> Generated:
        """One unary request; raises InferenceServerException on error."""
        request = budgeted(request, self.timeout_s)
        inputs = infer_inputs(tensors_from_request(request))
        result = with_retries(lambda: self.grpc.infer(model, inputs, outputs=OUTPUTS, client_timeout=request.timeout_s,
                                                      headers=routing_headers(request.loras)), self.retries)
        return generated(result)

    def stream(self, request: GenerationRequest) -> Iterator[Progress | Generated]:
        """Yields a Progress per step, then the Generated image; raises InferenceServerException on error.

        Closing the generator early closes the stream, and the server stops the request at its next step.
        """
        request = budgeted(request, self.timeout_s)
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            headers=routing_headers(request.loras))
        try:
            client.async_stream_infer(STREAM_MODEL, infer_inputs(tensors_from_request(request)),
                                      enable_empty_final_response=True)
            while True:
                message, last = stream_step(*responses.get(timeout=request.timeout_s))
                if message is not None:
                    yield message
                if last:
                    return
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()

    def generate_streaming(self, request: GenerationRequest,
                           on_progress: Callable[[Progress], None] | None = None) -> Generated:
        return last_image(message for message in self.stream(request) if not _reported(message, on_progress))

    def close(self) -> None:
        self.grpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """`Client`'s methods as coroutines, over tritonclient's asyncio gRPC client."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout_s: float | None = None, retries: int = 0):
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.grpc = grpcaio.InferenceServerClient(url)

    async def generate(self, request: GenerationRequest, model: str = MODEL) -> Generated:
        request = budgeted(request, self.timeout_s)
        inputs = infer_inputs(tensors_from_request(request))
        result = await with_retries_async(
            lambda: self.grpc.infer(model, inputs, outputs=OUTPUTS, client_timeout=request.timeout_s,
                                    headers=routing_headers(request.loras)), self.retries)
        return generated(result)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Progress | Generated]:
        request = budgeted(request, self.timeout_s)
        inputs = infer_inputs(tensors_from_request(request))

        async def sent():
            yield {"model_name": STREAM_MODEL, "inputs": inputs, "parameters": FINAL}

        responses = self.grpc.stream_infer(sent(), stream_timeout=request.timeout_s,
                                           headers=routing_headers(request.loras))
        try:
            async for result, error in responses:
                message, last = stream_step(result, error)
                if message is not None:
                    yield message
                if last:
                    return
        finally:
            responses.cancel()  # closes the stream: the server stops a request still running

    async def generate_streaming(self, request: GenerationRequest,
                                 on_progress: Callable[[Progress], None] | None = None) -> Generated:
        images = [message async for message in self.stream(request) if not _reported(message, on_progress)]
        return last_image(iter(images))

    async def close(self) -> None:
        await self.grpc.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _reported(message: Progress | Generated, on_progress: Callable[[Progress], None] | None) -> bool:
    """Hands a Progress to `on_progress`; True if it was one."""
    if isinstance(message, Progress):
        if on_progress is not None:
            on_progress(message)
        return True
    return False


def last_image(messages: Iterator[Generated]) -> Generated:
    found = None
    for found in messages:
        pass
    if found is None:
        raise InferenceServerException("the stream ended without an image")
    return found
