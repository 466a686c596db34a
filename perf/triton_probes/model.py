"""Probe models of perf/triton_gpu_check.py: one Python-backend model file, two roles (config parameter `role`).

caller  On a request (size, calls, concurrency) sends `calls` BLS requests to its callee, `concurrency` of them in
        flight at once, each with a latent and a control image of that size; checks every byte of every residual
        that comes back and answers with a JSON report: where inputs and outputs arrived, the exchange times, the
        first error.
callee  Checks its inputs' bytes and answers with SD1.5's 13 ControlNet residuals for that size (CFG batch of two,
        fp16: 26.9 MB at 512x512), each a known pattern that depends on the request's seed, so a lost, zeroed,
        shifted or stale block shows.

Parameters: `transport` numpy (tensors cross as host arrays, as swiftdiffusion/triton/serving.py does today) or
dlpack (`pb.Tensor.from_dlpack` / `to_dlpack` of torch tensors); `device` instance (the instance's device), cpu or
cuda:N, where the probe places its tensors itself; `preferred_memory` gpu, cpu or default (where the caller asks
BLS outputs to land); `inject` server_crash (tests only: the caller kills its server, as the GPU segfault did).
Needs numpy, and torch unless transport is numpy on the CPU.
"""

import json
import os
import signal
import time

import numpy as np
import triton_python_backend_utils as pb_utils

PRIME = 251  # patterns are (index + offset) mod a prime: exact in fp16, and no block equals its neighbour
RESIDUALS = 13
# What a DLPack residual path needs of the Python backend's API, reported by every caller.
API = ("Tensor.from_dlpack", "Tensor.to_dlpack", "Tensor.is_cpu", "PreferredMemory", "TRITONSERVER_MEMORY_GPU",
       "TRITONSERVER_MEMORY_CPU")


def has_api(path: str) -> bool:
    owner = pb_utils
    for name in path.split("."):
        if not hasattr(owner, name):
            return False
        owner = getattr(owner, name)
    return True


def residual_shapes(size: int, batch: int = 2) -> list[tuple[int, ...]]:
    """SD1.5's 12 down-block residuals and the mid-block residual for a size x size image."""
    latent = size // 8
    widths = [(320, 1)] * 3 + [(320, 2), (640, 2), (640, 2), (640, 4), (1280, 4), (1280, 4)] + [(1280, 8)] * 4
    return [(batch, channels, latent // down, latent // down) for channels, down in widths]


def input_shapes(size: int, batch: int = 2) -> dict[str, tuple[int, ...]]:
    return {"latent": (batch, 4, size // 8, size // 8), "cond": (batch, 3, size, size)}


class TritonPythonModel:
    def initialize(self, args):
        self.params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.transport = self.params["transport"]
        where = self.params["device"]
        if where == "instance":
            gpu = args["model_instance_kind"] == "GPU"
            where = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        self.device = where
        self.torch = None
        if self.transport == "dlpack" or self.device != "cpu":
            import torch

            self.torch = torch
            self.device = torch.device(where)

    # ---- tensors on this model's device, and across the process boundary ----
    def pattern(self, shape, offset):
        count = int(np.prod(shape))
        if self.torch is None:
            return ((np.arange(count, dtype=np.int64) + offset) % PRIME).astype(np.float16).reshape(shape)
        torch = self.torch
        values = (torch.arange(count, dtype=torch.int64, device=self.device) + offset) % PRIME
        return values.to(torch.float16).reshape(shape)

    def to_pb(self, name, value):
        if self.transport == "dlpack":
            return pb_utils.Tensor.from_dlpack(name, value)
        return pb_utils.Tensor(name, value if isinstance(value, np.ndarray) else value.cpu().numpy())

    def from_pb(self, tensor):
        """The tensor where it arrived (dlpack) or on this model's device (numpy, as serving.py does)."""
        if self.transport == "dlpack":
            return self.torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
        host = tensor.as_numpy()
        return host if self.torch is None else self.torch.from_numpy(host).to(self.device)

    def equal(self, value, expected):
        if self.torch is None:
            return value.shape == expected.shape and bool(np.array_equal(value, expected))
        return tuple(value.shape) == tuple(expected.shape) and bool(self.torch.equal(value.to(expected.device),
                                                                                      expected))

    def synchronize(self):
        if self.torch is not None and self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    # ---- roles ----
    def execute(self, requests):
        if self.params["role"] == "callee":
            return [self.answer(request) for request in requests]
        return self.call_all(requests)

    def answer(self, request):
        begin = time.perf_counter()
        seed = int(pb_utils.get_input_tensor_by_name(request, "seed").as_numpy().reshape(-1)[0])
        size = int(pb_utils.get_input_tensor_by_name(request, "cond").shape()[-1])
        report = {"inputs_on": [], "inputs_intact": True}
        for index, (name, shape) in enumerate(input_shapes(size).items()):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            report["inputs_on"].append("cpu" if tensor.is_cpu() else "gpu")
            report["inputs_intact"] &= self.equal(self.from_pb(tensor), self.pattern(shape, seed + index))
        outputs = [self.to_pb(f"r{k}", self.pattern(shape, seed + 2 + k))
                   for k, shape in enumerate(residual_shapes(size))]
        self.synchronize()
        report["compute_ms"] = 1e3 * (time.perf_counter() - begin)
        outputs.append(pb_utils.Tensor("callee_report", np.array([json.dumps(report).encode()], dtype=np.object_)))
        return pb_utils.InferenceResponse(outputs)

    async def call_all(self, requests):
        # One request at a time: the probe measures one client's calls, not contention between clients.
        return [await self.call(request) for request in requests]

    async def call(self, request):
        size, calls, concurrency = (int(pb_utils.get_input_tensor_by_name(request, n).as_numpy().reshape(-1)[0])
                                    for n in ("size", "calls", "concurrency"))
        report = {"transport": self.transport, "device": str(self.device), "size": size, "calls": 0,
                  "concurrency": concurrency, "bytes_in": 0, "bytes_out": 0, "inputs_on": [], "outputs_on": [],
                  "inputs_intact": True, "outputs_intact": True, "exchange_ms": [], "callee_ms": [], "error": None,
                  "api": {path: has_api(path) for path in API}}
        if self.params.get("inject") == "server_crash":
            os.kill(os.getppid(), signal.SIGKILL)  # the stub's parent is the server
        try:
            for first in range(0, calls, concurrency):
                await self.round([1000 * size + seed for seed in range(first, min(calls, first + concurrency))],
                                 size, report)
        except Exception as error:  # the report says what failed; the response itself succeeds
            report["error"] = f"{type(error).__name__}: {error}"
        report["inputs_on"], report["outputs_on"] = sorted(set(report["inputs_on"])), sorted(set(report["outputs_on"]))
        report["ok"] = report["error"] is None and report["inputs_intact"] and report["outputs_intact"]
        text = np.array([json.dumps(report).encode()], dtype=np.object_)
        return pb_utils.InferenceResponse([pb_utils.Tensor("report", text)])

    async def round(self, seeds, size, report):
        """`seeds` calls in flight at once; then every byte of every response checked."""
        begin = time.perf_counter()
        futures = [self.send(seed, size, report) for seed in seeds]  # async_exec sends at once
        responses = [await future for future in futures]
        report["exchange_ms"].append(1e3 * (time.perf_counter() - begin))
        for seed, response in zip(seeds, responses, strict=True):
            if response.has_error():
                raise RuntimeError(f"callee: {response.error().message()}")
            self.check(seed, size, response, report)
            report["calls"] += 1

    def send(self, seed, size, report):
        inputs = [self.to_pb(name, self.pattern(shape, seed + index))
                  for index, (name, shape) in enumerate(input_shapes(size).items())]
        self.synchronize()
        inputs.append(pb_utils.Tensor("seed", np.array([seed], dtype=np.int64)))
        report["bytes_in"] += sum(2 * int(np.prod(shape)) for shape in input_shapes(size).values())
        kwargs = {}
        if self.params["preferred_memory"] == "gpu":
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index)
        elif self.params["preferred_memory"] == "cpu":
            kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        names = [f"r{k}" for k in range(RESIDUALS)] + ["callee_report"]
        return pb_utils.InferenceRequest(model_name=self.params["callee"], inputs=inputs,
                                         requested_output_names=names, **kwargs).async_exec()

    def check(self, seed, size, response, report):
        callee = json.loads(pb_utils.get_output_tensor_by_name(response, "callee_report").as_numpy()[0])
        report["inputs_on"] += callee["inputs_on"]
        report["inputs_intact"] &= callee["inputs_intact"]
        report["callee_ms"].append(callee["compute_ms"])
        for k, shape in enumerate(residual_shapes(size)):
            tensor = pb_utils.get_output_tensor_by_name(response, f"r{k}")
            report["outputs_on"].append("cpu" if tensor.is_cpu() else "gpu")
            value = self.from_pb(tensor)
            report["bytes_out"] += 2 * int(np.prod(shape))
            report["outputs_intact"] &= self.equal(value, self.pattern(shape, seed + 2 + k))
