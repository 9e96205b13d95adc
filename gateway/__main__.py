"""`python -m gateway serve --config FILE` (production: an external Triton) or `python -m gateway embedded`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from gateway import auth, event_loop
from gateway.app import CANCELLED_REQUESTS_GRACE_S, cannot_listen, init_app, start_site
from gateway.logs import configure_logging
from gateway.settings import ConfigError, GatewaySettings
from gateway.state import LIFECYCLE

log = logging.getLogger("gateway")
SERVER_WATCH_INTERVAL_S = 1.0


async def _serve_until_signal(
    settings: GatewaySettings, banner: str, server_alive: Callable[[], bool] | None = None
) -> bool:
    """Serve until SIGINT/SIGTERM (True) or, when server_alive is given, until the server it watches dies
    (False)."""
    app = init_app(settings)
    runner = await start_site(app, settings.host, settings.port)
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    watcher = asyncio.create_task(_watch(server_alive, stop)) if server_alive is not None else None

    def on_signal() -> None:
        if stop.is_set():  # a second Ctrl-C: do not wait for the drain
            force.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    log.info("serving on %s's event loop", type(loop).__module__.split(".")[0])
    print(banner, flush=True)
    await stop.wait()
    lifecycle = app[LIFECYCLE]
    log.info("shutting down: draining %d request(s), up to %g s", lifecycle.in_flight, settings.drain_timeout_s)
    drain = asyncio.ensure_future(lifecycle.drain(settings.drain_timeout_s))
    forced = asyncio.ensure_future(force.wait())
    await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if not drain.done() or not drain.result():
        drain.cancel()
        log.warning("%s: %d request(s) still running are ended (503)",
                    "second signal" if force.is_set() else "drain timeout", lifecycle.in_flight)  # fmt: skip
        lifecycle.end_remaining()
        await lifecycle.wait_idle(CANCELLED_REQUESTS_GRACE_S)
    await runner.cleanup()
    log.info("stopped")
    if watcher is None:
        return True
    watcher.cancel()
    return server_alive is not None and server_alive()


async def _watch(server_alive: Callable[[], bool], stop: asyncio.Event) -> None:
    """The embedded Triton exiting on its own ends the gateway too: it would answer 503 forever otherwise."""
    while server_alive():
        await asyncio.sleep(SERVER_WATCH_INTERVAL_S)
    log.error("the embedded Triton server exited; stopping (its log says why)")
    stop.set()


def _serve(args: argparse.Namespace) -> int:
    settings = GatewaySettings.from_file(args.config)
    configure_logging(settings.log_format)
    banner = f"gateway on http://{settings.host}:{settings.port} serving {', '.join(m.id for m in settings.models)}"
    event_loop.run(_serve_until_signal(settings, banner), settings.event_loop)
    return 0


def _embedded(args: argparse.Namespace) -> int:
    from gateway.embedded import embedded_settings, prepare_embedded_triton

    configure_logging("text")
    _check_port_free(args.host, args.port)  # before minutes of conversion and Triton's start, not after
    print("preparing the reference model and its Triton repository (cached after the first run)...", flush=True)
    server, checkpoint = prepare_embedded_triton()
    print(f"starting Triton (log: {server.log_path})...", flush=True)
    with server:
        settings = embedded_settings(checkpoint, server.grpc_url, args.host, args.port)
        model = settings.models[0].id
        url = f"http://{settings.host}:{settings.port}"
        banner = (
            f"\nserving {model} at {url} (Triton gRPC {server.grpc_url}); Ctrl-C stops both.\n"
            f"open mode: no API keys are configured.\n\ntry:\n"
            f"  curl -s {url}/v4/completions -H 'content-type: application/json' \\\n"
            f'    -d \'{{"model": "{model}", "prompt": "<|im_start|>user\\nWhat is the capital of France?'
            f'<|im_end|>\\n<|im_start|>assistant\\n", "model_parameters": {{"temperature": 0}}}}\'\n'
        )
        serving = _serve_until_signal(settings, banner, server.is_running)
        served_to_the_end = event_loop.run(serving, settings.event_loop)
    return 0 if served_to_the_end else 1


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket will
        try:
            probe.bind((host, port))
        except OSError as error:
            raise cannot_listen(host, port, error) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve against the Triton endpoints of a config file")
    serve.add_argument("--config", type=Path, required=True)
    serve.set_defaults(run=_serve)
    embedded = commands.add_parser("embedded", help="start the embedded Triton with the reference model, and serve")
    embedded.add_argument("--host", default="127.0.0.1")
    embedded.add_argument("--port", type=int, default=8080)
    embedded.set_defaults(run=_embedded)
    hash_key = commands.add_parser("hash-key", help="print the sha256 of an API key (read from stdin) for the config")
    hash_key.set_defaults(run=_hash_key)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as error:  # a configuration it cannot start with: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


def _hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("error: give the key on standard input (echo -n KEY | python -m gateway hash-key)", file=sys.stderr)
        return 2
    print(auth.hash_key(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
