"""Metrics on Triton's metrics endpoint (`pb_utils.MetricFamily`): what the bounded LoRA loading costs, and the
work done and stopped per request."""

from __future__ import annotations

from typing import Any

from ..pipeline import DenoiseResult
from ..request import STOP_REASONS, GenerationRequest, RequestStopped

SECONDS_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
STEP_BUCKETS = [0, 1, 2, 3, 5, 10, 20, 50]


class LoraMetrics:
    def __init__(self, pb: Any, model: str):
        labels = {"model": model}
        self.families = []  # a metric is only valid while its family lives

        def family(name: str, doc: str, kind):
            self.families.append(pb.MetricFamily(name=name, description=doc, kind=kind))
            return self.families[-1]

        def histogram(name: str, doc: str, buckets: list[float]):
            return family(name, doc, pb.MetricFamily.HISTOGRAM).Metric(labels=labels, buckets=buckets)

        def counter(name: str, doc: str):
            return family(name, doc, pb.MetricFamily.COUNTER).Metric(labels=labels)

        self.load_s = histogram("swiftdiffusion_lora_load_seconds", "LoRA fetch + decode time per request",
                                SECONDS_BUCKETS)
        self.patch_s = histogram("swiftdiffusion_lora_patch_seconds", "LoRA in-place patch time", SECONDS_BUCKETS)
        self.restore_s = histogram("swiftdiffusion_lora_restore_seconds", "weight restore time", SECONDS_BUCKETS)
        self.wait_s = histogram("swiftdiffusion_lora_wait_seconds", "time the loop waited for LoRAs",
                                SECONDS_BUCKETS)
        self.step = histogram("swiftdiffusion_lora_apply_step", "step before which LoRAs were patched in",
                              STEP_BUCKETS)
        self.bytes_read = counter("swiftdiffusion_lora_bytes_read_total", "LoRA file bytes read")
        self.hits = counter("swiftdiffusion_lora_reuse_total", "requests whose LoRA set was already patched in")
        self.misses = counter("swiftdiffusion_lora_loads_total", "requests that loaded their LoRA set")
        self.cache_hits = counter("swiftdiffusion_lora_cache_hits_total", "LoRAs served decoded from the host cache")
        self.cache_misses = counter("swiftdiffusion_lora_cache_misses_total", "LoRAs read and decoded")
        self.cache_bytes = family("swiftdiffusion_lora_cache_bytes", "decoded LoRAs held in the host cache",
                                  pb.MetricFamily.GAUGE).Metric(labels=labels)

    def record(self, request: GenerationRequest, result: DenoiseResult, cache_bytes: int) -> None:
        self.restore_s.observe(result.timings.restore_s)
        if not request.loras:
            return
        self.step.observe(result.lora_step)
        self.wait_s.observe(result.lora_wait_s)
        if result.timings.reused:
            self.hits.increment(1)
            return
        self.misses.increment(1)
        self.cache_hits.increment(result.timings.cache_hits)
        self.cache_misses.increment(len(request.loras) - result.timings.cache_hits)
        self.cache_bytes.set(cache_bytes)
        self.load_s.observe(result.timings.load_s)
        self.patch_s.observe(result.timings.patch_s)
        self.bytes_read.increment(result.timings.bytes_read)


class RequestMetrics:
    """Work done per request, and requests stopped before their end (by what stopped them)."""

    def __init__(self, pb: Any, model: str):
        self.families = [
            pb.MetricFamily(name="swiftdiffusion_denoise_steps_total", description="denoising steps run",
                            kind=pb.MetricFamily.COUNTER),
            pb.MetricFamily(name="swiftdiffusion_requests_stopped_total",
                            description="requests stopped before their end: client cancelled, time budget out",
                            kind=pb.MetricFamily.COUNTER),
        ]
        self.steps = self.families[0].Metric(labels={"model": model})
        self.stopped = {reason: self.families[1].Metric(labels={"model": model, "reason": reason})
                        for reason in STOP_REASONS}

    def finished(self, steps: int) -> None:
        self.steps.increment(steps)

    def stopped_early(self, stopped: RequestStopped) -> None:
        self.steps.increment(stopped.steps_done)
        self.stopped[stopped.field].increment(1)
