"""The application factory: settings in, a ready aiohttp application out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.completions import finish_pending_stops
from gateway.middlewares import request_id_and_errors
from gateway.registry import ModelRegistry
from gateway.routes import setup_routes
from gateway.settings import GatewaySettings
from gateway.state import REGISTRY, SETTINGS
from gateway.triton_channel import open_endpoints

log = logging.getLogger(__name__)


async def _triton_channels(app: web.Application) -> AsyncIterator[None]:
    """One long-lived gRPC channel per Triton endpoint for the life of the app; tokenizers loaded once."""
    settings = app[SETTINGS]
    addresses = [address for model in settings.models for address in model.endpoints]
    async with open_endpoints(addresses) as endpoints:
        app[REGISTRY] = ModelRegistry.load(settings.models, endpoints)
        log.info("serving models: %s", ", ".join(m.id for m in settings.models) or "(none)")
        yield
        await finish_pending_stops()


def init_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(middlewares=[request_id_and_errors], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_triton_channels)
    setup_routes(app)
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler, which ends its generation.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
