"""Typed application state (aiohttp AppKeys): what the handlers may read from the app."""

from __future__ import annotations

from aiohttp import web

from gateway.accounting import Accounting
from gateway.auth import Authenticator
from gateway.images import ImagePolicy
from gateway.ledger.databases import LedgerDatabase
from gateway.lifecycle import Lifecycle
from gateway.metrics import GatewayMetrics
from gateway.registry import ModelRegistry
from gateway.replicas import SharedCheck
from gateway.settings import GatewaySettings

SETTINGS: web.AppKey[GatewaySettings] = web.AppKey("settings", GatewaySettings)
REGISTRY: web.AppKey[ModelRegistry] = web.AppKey("registry", ModelRegistry)
AUTHENTICATOR: web.AppKey[Authenticator] = web.AppKey("authenticator", Authenticator)
METRICS: web.AppKey[GatewayMetrics] = web.AppKey("metrics", GatewayMetrics)
ACCOUNTING: web.AppKey[Accounting] = web.AppKey("accounting", Accounting)
LEDGER_DATABASE: web.AppKey[LedgerDatabase | None] = web.AppKey("ledger_database")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle", Lifecycle)
IMAGE_POLICY: web.AppKey[ImagePolicy] = web.AppKey("image_policy", ImagePolicy)
READINESS_CHECK: web.AppKey[SharedCheck] = web.AppKey("readiness_check", SharedCheck)
