"""The application factory: settings in, a ready aiohttp application out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.accounting import Accounting
from gateway.auth import Authenticator
from gateway.completions import finish_pending_stops
from gateway.images import ImagePolicy
from gateway.ledger.databases import open_ledger_database
from gateway.ledger.writer import LedgerWriter
from gateway.lifecycle import Lifecycle
from gateway.metrics import GatewayMetrics
from gateway.middlewares import request_id_and_errors
from gateway.registry import ModelRegistry
from gateway.replicas import EndpointDirectory, SharedCheck, health_monitor
from gateway.routes import setup_routes
from gateway.settings import ConfigError, GatewaySettings
from gateway.state import (
    ACCOUNTING,
    AUTHENTICATOR,
    IMAGE_POLICY,
    LEDGER_DATABASE,
    LIFECYCLE,
    METRICS,
    READINESS_CHECK,
    REGISTRY,
    SETTINGS,
)

log = logging.getLogger(__name__)


async def _triton_channels(app: web.Application) -> AsyncIterator[None]:
    """One long-lived gRPC channel per Triton replica for the life of the app, health-checked in the background;
    tokenizers loaded once."""
    settings = app[SETTINGS]
    directory = EndpointDirectory()
    try:
        registry = app[REGISTRY] = ModelRegistry.load(settings, directory)
        pools = [model.replicas for model in registry.models.values()]
        async with health_monitor(
            pools, settings.health_check_interval_s, settings.dns_refresh_s, settings.readiness_timeout_s, directory
        ):
            log.info("serving models: %s", ", ".join(m.id for m in settings.models) or "(none)")
            yield
            await finish_pending_stops()
    finally:
        await directory.close()


async def _usage_ledger(app: web.Application) -> AsyncIterator[None]:
    """The ledger writer lives as long as the app; on shutdown it flushes (or spills) what is queued."""
    settings = app[SETTINGS]
    if not settings.ledger_enabled:
        app[LEDGER_DATABASE] = None
        app[ACCOUNTING] = Accounting(app[METRICS], None)
        log.info("usage ledger: off")
        yield
        return
    database = open_ledger_database(settings.ledger_dsn, settings.data_dir)
    writer = LedgerWriter(
        database,
        app[METRICS],
        spill_dir=settings.ledger_spill,
        batch_size=settings.ledger_batch_size,
        flush_interval_s=settings.ledger_flush_interval_s,
        queue_size=settings.ledger_queue_size,
        retry_s=settings.ledger_retry_s,
    )
    app[LEDGER_DATABASE] = database
    app[ACCOUNTING] = Accounting(app[METRICS], writer)
    log.info("usage ledger: %s", database.describe())
    await writer.start()
    try:
        yield
    finally:
        await writer.close()


def init_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(middlewares=[request_id_and_errors], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = GatewayMetrics()
    app[LIFECYCLE] = Lifecycle()
    app[READINESS_CHECK] = SharedCheck()
    app[AUTHENTICATOR] = Authenticator(settings.api_keys)
    app[IMAGE_POLICY] = ImagePolicy.from_strings(
        settings.image_fetch_allowed_networks,
        max_images=settings.max_images_per_request,
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        timeout_s=settings.image_fetch_timeout_s,
        max_redirects=settings.image_fetch_max_redirects,
    )
    if app[AUTHENTICATOR].open_mode:
        log.warning("open mode: no API keys are configured, every request is accepted (local development only)")
    else:
        log.info("API keys: %d configured; require_account=%s", len(settings.api_keys), settings.require_account)
    app.cleanup_ctx.append(_usage_ledger)
    app.cleanup_ctx.append(_triton_channels)
    setup_routes(app)
    return app


CANCELLED_REQUESTS_GRACE_S = 2.0


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler, which ends its generation.
    # shutdown_timeout: by the time the runner stops, the lifecycle's drain (drain_timeout_s) has waited for the
    # requests in flight; those still running are cancelled and get this long to record their usage and stop
    # their generation (aiohttp's default, 60 s, came on top of the drain).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=CANCELLED_REQUESTS_GRACE_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()  # the app started (channels, ledger): stop it before reporting
        raise cannot_listen(host, port, error) from None
    return runner


def cannot_listen(host: str, port: int, error: OSError) -> ConfigError:
    return ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}")
