"""Several Triton replicas behind one model id: least-outstanding-requests balancing and health tracking.

Each model has a `ReplicaPool`. A replica is one Triton gRPC address; the `TritonEndpoint` (channel and its
in-flight count) is shared by every model served from that address, so the load a replica carries counts all
of its models. Health comes from two sides:

- active: a background loop asks every replica `ModelReady(ensemble)` every `health_check_interval_s`;
- passive: a stream that fails because the replica is unreachable marks it down at once.

A replica that is down gets no new requests until an active check finds it ready again. With
`discovery = "dns"` the pool re-resolves each configured `host:port` every `dns_refresh_s` and keeps one
replica per address found (a Kubernetes headless service lists one address per ready Triton pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from gateway.errors import UpstreamUnavailable
from gateway.settings import ModelEntry
from gateway.triton_channel import TritonEndpoint

log = logging.getLogger(__name__)


class EndpointDirectory:
    """One TritonEndpoint per address for the whole gateway, opened on first use."""

    def __init__(self) -> None:
        self._endpoints: dict[str, TritonEndpoint] = {}

    def get(self, address: str) -> TritonEndpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = TritonEndpoint(address)
        return endpoint

    async def close(self) -> None:
        for endpoint in self._endpoints.values():
            await endpoint.close()
        self._endpoints.clear()

    @property
    def addresses(self) -> set[str]:
        """The replicas a channel is open to."""
        return set(self._endpoints)

    async def close_unused(self, in_use: set[str]) -> None:
        """Close the channels of replicas no pool has any more (they left DNS) once their streams are done:
        an open channel to a pod that is gone reconnects for ever."""
        for address in [a for a, e in self._endpoints.items() if a not in in_use and e.in_flight == 0]:
            await self._endpoints.pop(address).close()


@dataclass
class Replica:
    endpoint: TritonEndpoint
    ready: bool | None = None  # None: not checked yet (eligible, so a request right after start-up is served)
    last_error: str | None = None
    # A crashed model stub: Triton still answers ModelReady with true, so health checks send a real one-token
    # request through the ensemble until it works again (the model reloaded, or Triton restarted).
    needs_probe: bool = False
    checks_failed: int = 0
    marked_down: int = 0  # times a request found it failed: a health check that started before one is stale
    probed_at: float = field(default_factory=time.monotonic)  # the last successful one-token probe

    @property
    def address(self) -> str:
        return self.endpoint.address

    def state(self) -> dict[str, object]:
        return {
            "ready": bool(self.ready),
            "in_flight": self.endpoint.in_flight,
            "error": None if self.ready else self.last_error,
        }


@dataclass
class ReplicaPool:
    entry: ModelEntry
    directory: EndpointDirectory
    replicas: dict[str, Replica] = field(default_factory=dict)
    _rotation: itertools.count[int] = field(default_factory=itertools.count)
    # A replica that fails its health check and has sent nothing on any open stream for this long has stopped
    # answering: its streams are cut. A busy replica keeps streaming tokens: a slow health answer alone cuts none.
    stalled_after_s: float = 10.0
    # An idle replica gets a real one-token request this often: a crashed model process shows no other way
    # (Triton keeps answering ModelReady with true), and with no traffic no request would find it.
    probe_interval_s: float = 30.0
    _resolved: dict[str, list[str]] = field(default_factory=dict)  # each DNS name's last addresses

    def __post_init__(self) -> None:
        if self.entry.discovery == "static":
            self._set_addresses(self.entry.endpoints)

    # ---- choosing a replica ----------------------------------------------------------------------

    def pick(self, exclude: Iterable[str] = ()) -> TritonEndpoint:
        """The eligible replica with the fewest requests in flight (ties rotate so equal replicas share)."""
        excluded = set(exclude)
        candidates = [r for r in self.replicas.values() if r.ready is not False and r.address not in excluded]
        if not candidates:
            raise UpstreamUnavailable(self._unavailable_message(excluded))
        start = next(self._rotation) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda r: r.endpoint.in_flight).endpoint

    def mark_down(self, address: str, reason: str, needs_probe: bool = False) -> None:
        replica = self.replicas.get(address)
        if replica is None:
            return
        if replica.ready is not False:
            log.warning("model %s: replica %s marked down: %s", self.entry.id, address, reason)
        replica.ready = False
        replica.last_error = reason
        replica.needs_probe = replica.needs_probe or needs_probe
        replica.marked_down += 1

    def _unavailable_message(self, tried: set[str]) -> str:
        # Addresses stay out of client-facing messages (they are in the logs and on /readyz); reasons do not.
        if not self.replicas:
            return f"model '{self.entry.id}' has no inference server replicas (none found in DNS)"
        reasons = sorted({r.last_error or "not ready" for r in self.replicas.values()})
        if tried:
            reasons.append(f"{len(tried)} failed on this request")
        return (
            f"no inference server replica is ready for model '{self.entry.id}' "
            f"({len(self.replicas)} replica(s): {'; '.join(reasons)})"
        )

    # ---- health ----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return any(r.ready for r in self.replicas.values())

    async def check(self, timeout_s: float) -> None:
        """Ask every replica whether the ensemble is ready, concurrently; update their states."""
        replicas = list(self.replicas.values())
        now = time.monotonic()
        # The periodic probe goes only to idle replicas: one queued behind a full batch would time out on a
        # healthy, busy replica, and a busy replica's own requests find a crash.
        due = [r.endpoint.in_flight == 0 and now - r.probed_at >= self.probe_interval_s for r in replicas]
        marks = [r.marked_down for r in replicas]
        results = await asyncio.gather(*(self._check_one(r, timeout_s, d) for r, d in zip(replicas, due, strict=True)))
        for replica, mark, (ready, reason) in zip(replicas, marks, results, strict=True):
            if ready and replica.marked_down != mark:
                continue  # a request found it failed while this check was on its way: the next check decides
            if ready and replica.ready is not True:
                log.info("model %s: replica %s is ready", self.entry.id, replica.address)
            replica.ready = ready
            replica.last_error = None if ready else reason
            replica.checks_failed = 0 if ready else replica.checks_failed + 1
            if not ready and replica.endpoint.stalled(self.stalled_after_s):
                log.warning("model %s: replica %s is down and its open streams got nothing for %g s; cut",
                            self.entry.id, replica.address, self.stalled_after_s)  # fmt: skip
                replica.endpoint.abandon_stalled_calls(f"the inference server stopped answering ({reason})")

    async def _check_one(self, replica: Replica, timeout_s: float, probe_due: bool) -> tuple[bool, str | None]:
        if replica.needs_probe or probe_due:
            healthy, reason = await replica.endpoint.probe(self.entry.ensemble, timeout_s)
            if not healthy:
                return False, reason
            replica.needs_probe = False
            replica.probed_at = time.monotonic()
        return await replica.endpoint.model_ready(self.entry.ensemble, timeout_s)

    def state(self) -> dict[str, dict[str, object]]:
        return {address: replica.state() for address, replica in self.replicas.items()}

    # ---- discovery -------------------------------------------------------------------------------

    async def discover(self) -> None:
        """Re-resolve the configured names; replicas that vanished from DNS are dropped (in-flight ones finish).
        A name that fails to resolve keeps its last addresses: a DNS hiccup is not every replica leaving."""
        addresses: list[str] = []
        for target in self.entry.endpoints:
            host, _, port = target.rpartition(":")
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as error:
                kept = self._resolved.get(target, [])
                log.warning("model %s: cannot resolve %s: %s (keeping %d address(es))", self.entry.id, target,
                            error, len(kept))  # fmt: skip
                addresses += kept
                continue
            found = []
            for family, _, _, _, sockaddr in infos:
                ip = str(sockaddr[0])
                found.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
            self._resolved[target] = found
            addresses += found
        if set(addresses) != set(self.replicas):
            log.info("model %s: replicas from DNS: %s", self.entry.id, sorted(set(addresses)) or "(none)")
        self._set_addresses(addresses)

    def _set_addresses(self, addresses: Iterable[str]) -> None:
        wanted = list(dict.fromkeys(addresses))
        self.replicas = {a: self.replicas.get(a) or Replica(self.directory.get(a)) for a in wanted}


class SharedCheck:
    """Callers that ask at the same time share one round of checks (a burst of /readyz calls sends each
    replica one ModelReady, not one per call); a caller that gives up does not cancel it for the others."""

    def __init__(self) -> None:
        self._round: asyncio.Future[object] | None = None

    async def run(self, start: Callable[[], Awaitable[object]]) -> None:
        if self._round is None or self._round.done():
            self._round = asyncio.ensure_future(start())
        await asyncio.shield(self._round)


@contextlib.asynccontextmanager
async def health_monitor(
    pools: list[ReplicaPool],
    interval_s: float,
    dns_refresh_s: float,
    timeout_s: float,
    directory: EndpointDirectory,
) -> AsyncIterator[None]:
    """Run discovery and health checks in the background for as long as the context is open."""

    async def loop() -> None:
        clock = asyncio.get_running_loop().time
        last_discovery = clock()
        while True:
            await asyncio.sleep(interval_s)
            try:
                if clock() - last_discovery >= dns_refresh_s:
                    last_discovery = clock()
                    await asyncio.gather(*(p.discover() for p in pools if p.entry.discovery == "dns"))
                await directory.close_unused({address for p in pools for address in p.replicas})
                await asyncio.gather(*(p.check(timeout_s) for p in pools))
            except Exception:  # a bug here must not end health checking for the life of the gateway
                log.exception("health check round failed")

    # One round before serving, so the first requests already know which replicas are up.
    await asyncio.gather(*(p.discover() for p in pools if p.entry.discovery == "dns"))
    await asyncio.gather(*(p.check(timeout_s) for p in pools))
    task = asyncio.create_task(loop(), name="triton-health")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
