"""`perf/soak.py`: two minutes of open-loop load with every fault injected in each of two windows, against a
tritonserver of its own (a killed ControlNet stub must not reach the session server); every criterion passes.
Plus the soak's bookkeeping (failure classification, the RSS rule across a restarted stub) on made-up records."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import soak  # noqa: E402  (perf/soak.py)

pytestmark = pytest.mark.server


def test_two_minute_soak_with_faults_passes_every_criterion(tiny_root, tmp_path):
    out = tmp_path / "soak"
    code = soak.main(["--minutes", "2", "--window-minutes", "1", "--capacity-seconds", "15", "--models",
                      str(tiny_root), "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads((out / "soak.json").read_text())
    failed = {name: c for name, c in result["criteria"].items() if not c["ok"]}
    assert not failed, (failed, result["unexpected"][:5], [f for f in result["faults"] if not f["expected"]])
    assert code == 0 and result["passed"]
    assert result["criteria"]["every_fault_injected_each_window"]["injected"] == {kind: 2 for kind in soak.FAULTS}
    assert len(result["windows"]) == 2 and all(w["served_ordinary"] > 0 for w in result["windows"])
    assert {"tritonserver", "denoiser_0_0", "controlnet_0_0", "controlnet_0_1"} <= set(
        result["windows"][0]["rss_max_kb"])
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tiny_root / soak.LORA_FOLDER).glob("corrupt_*"))  # the bad files are gone again


def _fake(samples, results=(), disturbances=()):
    fake = SimpleNamespace(window_s=60.0, windows=3, monitor=SimpleNamespace(samples=samples),
                           results=list(results), disturbances=list(disturbances), drain_s=5.0)
    fake.window_of = lambda t: soak.Soak.window_of(fake, t)
    return fake


def test_rss_rule_compares_a_restarted_stub_from_its_restart_on():
    samples = [{"t": t, "rss_kb": {"tritonserver": 1000, "controlnet_0_0": rss}, "pid": {"tritonserver": 1,
                                                                                          "controlnet_0_0": pid}}
               for t, rss, pid in ((10, 500, 7), (70, 520, 7), (80, 800, 8), (130, 830, 8))]
    check = soak.rss_check(_fake(samples))
    assert check["ok"], check  # 520/500 and 830/800 are within 5%; 800 (a new pid) is not compared with 500
    samples[-1]["rss_kb"]["controlnet_0_0"] = 900  # 900/800: 12.5% above the restarted stub's first window
    check = soak.rss_check(_fake(samples))
    assert not check["ok"] and check["worst_ratio"] == pytest.approx(900 / 800)
    bad = [p for p in check["processes"] if not p["ok"]]
    assert [(p["process"], p["pid"], p["first_window"]) for p in bad] == [("controlnet_0_0", 8, 1)]


def test_failures_are_expected_only_within_their_fault_window():
    queue_full = dict(ok=False, status=soak.UNAVAILABLE, message="Exceeds maximum queue size")
    dead = dict(ok=False, status=soak.INTERNAL, message="ControlNet 'canny' failed: 'controlnet_0_0' is not healthy")
    results = [soak.Result("load", 0, 10.0, 10.5, **queue_full), soak.Result("load", 1, 30.0, 30.5, **queue_full),
               soak.Result("load", 7, 15.0, 15.1, **queue_full), soak.Result("load", 8, 19.0, 19.1, **queue_full),
               soak.Result("load", 2, 41.0, 42.0, **dead), soak.Result("load", 3, 90.0, 91.0, **dead),
               soak.Result("load", 4, 5.0, 6.0, ok=False, status=soak.INTERNAL, message="RuntimeError: boom"),
               soak.Result("load", 5, 5.0, math.nan), soak.Result("load", 6, 5.0, 5.2, ok=True)]
    fake = _fake([], results, [{"kind": "queue_burst", "start": 9.0, "end": 12.0},
                               {"kind": "kill_controlnet", "start": 40.0, "end": 75.0}])
    soak.Soak.classify(fake)
    assert [(r.kind, r.expected) for r in results] == [
        ("queue_full", True), ("queue_full_outside_burst_or_reload", False),
        ("queue_full", True), ("queue_full", True),  # the burst's saturation goes on (refusals 5 s apart at most)
        ("killed_controlnet", True), ("dead_controlnet_outside_kill", False), (soak.INTERNAL, False),
        ("no_response", False), ("", None)]


def test_a_replaced_stub_stays_stale_after_its_replacement_died(monkeypatch, tmp_path):
    """A reload that never finished unloading leaves the old `controlnet_0_1` beside the new one; once the new one
    is killed the old one is the only `controlnet_0_1` again, and must still count as stale."""
    alive = [("controlnet_0_1", 10, 100), ("denoiser_0_0", 11, 100)]
    monkeypatch.setattr(soak, "all_stubs", lambda repository: list(alive))
    superseded = {}
    assert soak.stale_stubs(tmp_path, superseded) == {}
    alive.append(("controlnet_0_1", 20, 200))  # the reload's new stub; the old one (10) did not exit
    assert soak.stale_stubs(tmp_path, superseded) == {"controlnet_0_1": [10]}
    assert soak.stub_processes(tmp_path)["controlnet_0_1"] == 20
    alive.remove(("controlnet_0_1", 20, 200))  # the new one killed
    assert soak.stale_stubs(tmp_path, superseded) == {"controlnet_0_1": [10]}


class _RefusingServer:
    """A gRPC client stand-in that refuses the first `refusals` sends with a full queue, then fails with `last`."""

    def __init__(self, refusals: int, last: Exception | None = None):
        self.refusals, self.last, self.sent = refusals, last, 0

    def async_infer(self, model, inputs, callback, outputs, client_timeout):
        self.sent += 1
        if self.sent <= self.refusals:
            callback(result=None, error=soak.InferenceServerException(
                "[request id: <id_unknown>] Exceeds maximum queue size", status=soak.UNAVAILABLE))
        else:
            callback(result=None, error=self.last)


class _Clock:
    """The soak's clock and its resend timer, made deterministic: a timer advances the clock by its wait and
    fires at once."""

    def __init__(self):
        self.now = 0.0

    def timer(self, wait: float, function):
        self.now += wait
        return SimpleNamespace(start=function)


def _sender(grpc, request_timeout: float, clock: _Clock):
    sender = object.__new__(soak.Soak)
    sender.grpc, sender.args = grpc, SimpleNamespace(request_timeout=request_timeout)
    sender.clock = lambda: clock.now
    sender.lock = soak.threading.Lock()
    sender.settled, sender.pending, sender.results = soak.threading.Condition(sender.lock), 0, []
    return sender


@pytest.mark.parametrize("refusals, retries, timeout, resent, final_status", [
    (2, 6, 120.0, 2, "StatusCode.INTERNAL"),  # resent twice, then the server's real answer stands
    (9, 3, 120.0, 3, soak.UNAVAILABLE),  # still refused after its retries: the refusal is the answer
    (1, 0, 120.0, 0, soak.UNAVAILABLE),  # a burst request is never resent
    (9, 100, 3.5, 2, soak.UNAVAILABLE),  # the client's deadline comes first: 1 + 2 s waited, 3 s more would pass it
])
def test_open_loop_resends_queue_full_refusals_with_backoff(monkeypatch, refusals, retries, timeout, resent,
                                                             final_status):
    clock = _Clock()
    monkeypatch.setattr(soak, "backoff_s", lambda attempt: float(attempt + 1))
    monkeypatch.setattr(soak.threading, "Timer", clock.timer)
    grpc = _RefusingServer(refusals, soak.InferenceServerException("boom", status="StatusCode.INTERNAL"))
    sender = _sender(grpc, timeout, clock)
    record = soak.Result("load", 0, 0.0)
    sender.send(record, soak.small_request(0, 64, 2), retries=retries)
    assert sender.wait_settled(5.0)
    assert (record.refusals, record.status, grpc.sent) == (resent, final_status, resent + 1)
    assert not record.ok and sender.results == [record]
