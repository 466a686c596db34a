"""Routing requests over many tritonserver replicas with Envoy: the LoRA-set header and the Envoy configuration.

Two policies (README "Running on Kubernetes"; `perf/routing_sim.py` decides the default):
- `least_request` (default): Envoy's least-request balancer scanning every replica (FULL_SCAN): the one with the
  fewest requests in flight from this Envoy, ties at random.
- `lora_affinity`: Envoy's ring hash on the `swiftdiffusion-lora-set` header that the client library sends (a
  stable hash of the request's LoRA names and scales, as the server keys its patched set), so the requests of one
  LoRA set meet the replica whose weights already hold it (no restore, no patch) and whose host cache holds its
  LoRAs; bounded (Envoy's `hash_balance_factor`): a replica above 125% of the average load passes the request on.
Both retry a request refused with UNAVAILABLE (a replica at capacity), reset, or not connected, on another
replica (`previous_hosts`), check each replica with gRPC health checks (Triton answers NOT_SERVING while it is
not ready, e.g. while a model reloads) and eject one that stops accepting connections (outlier detection on
local-origin failures only: an UNAVAILABLE refusal is load, not a broken replica).

`python -m swiftdiffusion.routing --policy lora_affinity` prints the configuration deploy/ ships.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from typing import Any, Sequence

import numpy as np

LORA_SET_HEADER = "swiftdiffusion-lora-set"
POLICIES = ("least_request", "lora_affinity")
# Entries on Envoy's hash ring (its default is 1024): with few entries per replica the key shares of replicas
# differ widely (16 each at 64 replicas: +-25%); 16384 keeps them within a few percent. The simulation uses it too.
RING_SIZE = 16384
CLUSTER = "triton"
# lora_affinity's bound: a replica takes a request of its LoRA sets only while it has fewer requests in flight
# than 1.25x the average; beyond it the request goes to another replica. Without a bound one popular LoRA set
# overloads its replica (perf/results/routing_sim.json: the most used set is 12% of service A's requests, 35% of B's).
HASH_BALANCE_FACTOR = 125
# Retries must resend the request, so Envoy buffers its body up to this: a 1024x1024 request with four control
# images is 12 MiB of tensors.
REQUEST_BUFFER_BYTES = 64 * 1024 * 1024


def lora_set_key(loras: Sequence[Any]) -> str | None:
    """A stable 16-hex-digit key of a request's LoRA set, or None without LoRAs.

    It hashes what the server compares to decide that a set is already patched in: the names in request order
    and the scales as the FP32 tensor carries them (0.8 arrives as 0.800000011920929), so two requests get the
    same key exactly when a replica would reuse one's weights for the other.
    """
    if not loras:
        return None
    canonical = json.dumps([[use.name, float(np.float32(use.scale))] for use in loras])
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def routing_headers(loras: Sequence[Any]) -> dict[str, str]:
    """The gRPC metadata that lets a LoRA-affinity proxy route a request: empty without LoRAs (Envoy then picks a
    replica at random)."""
    key = lora_set_key(loras)
    return {LORA_SET_HEADER: key} if key is not None else {}


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    """Envoy's active gRPC health check of each replica (`grpc.health.v1.Health/Check`, which Triton answers
    SERVING only while it is ready)."""

    interval_s: float = 2.0
    timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclasses.dataclass(frozen=True)
class Upstreams:
    """Where the replicas are: fixed addresses (`dns=False`), or one DNS name resolving to every ready pod of a
    headless Service (`dns=True`: Envoy's STRICT_DNS, one host per address)."""

    addresses: tuple[tuple[str, int], ...]
    dns: bool = False


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _route(policy: str, retries: int) -> dict:
    route: dict[str, Any] = {
        "cluster": CLUSTER,
        "timeout": "0s",  # no proxy deadline of its own: the client's grpc-timeout is the request's deadline
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},
        "retry_policy": {
            "retry_on": "unavailable,reset,connect-failure,refused-stream",
            "num_retries": retries,
            "retry_host_predicate": [{
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/"
                                          "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
            "host_selection_retry_max_attempts": 5,
            "retry_back_off": {"base_interval": "0.05s", "max_interval": "1s"},
        },
    }
    if policy == "lora_affinity":
        route["hash_policy"] = [{"header": {"header_name": LORA_SET_HEADER}}]
    return route


def _listener(address: tuple[str, int], policy: str, retries: int) -> dict:
    manager = {
        "@type": "type.googleapis.com/"
                 "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "grpc",
        "codec_type": "AUTO",
        "route_config": {"name": CLUSTER, "virtual_hosts": [{
            "name": CLUSTER, "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": _route(policy, retries),
                        "per_request_buffer_limit_bytes": REQUEST_BUFFER_BYTES}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"name": "grpc", "address": _address(*address), "per_connection_buffer_limit_bytes": REQUEST_BUFFER_BYTES,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": manager}]}]}


def _balancing(policy: str, hash_balance_factor: int | None) -> dict:
    """Envoy's load-balancing policy extension for `policy` (measured against the alternatives by
    perf/routing_sim.py: full scan rather than Envoy's default of two random choices)."""
    if policy == "least_request":
        name, config = "least_request", {"selection_method": "FULL_SCAN"}
    else:
        name, config = "ring_hash", {"minimum_ring_size": RING_SIZE, "maximum_ring_size": RING_SIZE}
        if hash_balance_factor is not None:
            config["consistent_hashing_lb_config"] = {"hash_balance_factor": hash_balance_factor}
    kind = "".join(part.title() for part in name.split("_"))
    return {"load_balancing_policy": {"policies": [{"typed_extension_config": {
        "name": f"envoy.load_balancing_policies.{name}",
        "typed_config": {"@type": f"type.googleapis.com/envoy.extensions.load_balancing_policies.{name}.v3.{kind}",
                         **config}}}]}}


def _cluster(upstreams: Upstreams, policy: str, hash_balance_factor: int | None, health: HealthCheck) -> dict:
    cluster = {
        "name": CLUSTER,
        "type": "STRICT_DNS" if upstreams.dns else "STATIC",
        "connect_timeout": "1s",
        **_balancing(policy, hash_balance_factor),
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _address(host, port)}} for host, port in upstreams.addresses]}]},
        "health_checks": [{
            "timeout": _seconds(health.timeout_s), "interval": _seconds(health.interval_s),
            # Envoy checks an idle cluster only once a minute by default: a replica would stay in rotation that long.
            "no_traffic_interval": _seconds(health.interval_s),
            "unhealthy_threshold": health.unhealthy_threshold, "healthy_threshold": health.healthy_threshold,
            "grpc_health_check": {}}],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_consecutive_5xx": 0,  # UNAVAILABLE (503) is a replica at capacity, answered by retries
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "interval": "1s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
        # Envoy's defaults (3 concurrent retries, 1024 requests) would refuse a burst that the replicas' queues
        # take; the replicas' own queue bound (`--max-queue`) is the admission control.
        "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                             "max_requests": 100000, "max_retries": 1000}]},
    }
    if upstreams.dns:
        cluster.update(dns_refresh_rate="5s", dns_lookup_family="V4_ONLY")
    return cluster


def envoy_config(upstreams: Upstreams, policy: str = "least_request", listen: tuple[str, int] = ("127.0.0.1", 8001),
                 admin: tuple[str, int] = ("127.0.0.1", 9901), hash_balance_factor: int | None = HASH_BALANCE_FACTOR,
                 health: HealthCheck = HealthCheck(), retries: int = 3) -> dict:
    """Envoy's bootstrap configuration (v3, static resources): one gRPC listener in front of the replicas.

    `hash_balance_factor` applies to `lora_affinity` only; None turns the bound off (plain ring hash)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    if hash_balance_factor is not None and hash_balance_factor < 100:
        raise ValueError("hash_balance_factor is a percentage of the average load, at least 100")
    return {
        "admin": {"address": _address(*admin)},
        "static_resources": {"listeners": [_listener(listen, policy, retries)],
                             "clusters": [_cluster(upstreams, policy, hash_balance_factor, health)]},
    }


# What deploy/ ships: Envoy in its own pod, in front of the headless Service's pods.
KUBERNETES_UPSTREAMS = Upstreams((("swiftdiffusion-triton.swiftdiffusion.svc.cluster.local", 8001),), dns=True)


def kubernetes_config(policy: str, hash_balance_factor: int | None = HASH_BALANCE_FACTOR) -> dict:
    """The Envoy configuration of deploy/ for `policy`: listening on every address of its pod, admin on loopback
    (reached with `kubectl port-forward`)."""
    return envoy_config(KUBERNETES_UPSTREAMS, policy, listen=("0.0.0.0", 8001), hash_balance_factor=hash_balance_factor)


def to_yaml(config: dict, rendered_by: str = "") -> str:
    """The configuration as Envoy's YAML, headed by the command that rendered it (if any)."""
    import yaml

    header = f"# Rendered by `{rendered_by}` (swiftdiffusion/routing.py): edit that, not this.\n" if rendered_by else ""
    return header + yaml.safe_dump(config, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftdiffusion.routing",
                                     description="print the Envoy configuration deploy/ ships for a routing policy")
    parser.add_argument("--policy", choices=POLICIES, default="least_request")
    parser.add_argument("--hash-balance-factor", type=int, default=HASH_BALANCE_FACTOR,
                        help="with lora_affinity: a replica takes at most this percent of the average load "
                             "(default %(default)s)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m swiftdiffusion.routing", *(sys.argv[1:] if argv is None else argv)])
    sys.stdout.write(to_yaml(kubernetes_config(args.policy, args.hash_balance_factor), command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
