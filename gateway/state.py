"""Typed application state (aiohttp AppKeys): what the handlers may read from the app."""

from __future__ import annotations

from aiohttp import web

from gateway.registry import ModelRegistry
from gateway.settings import GatewaySettings

SETTINGS: web.AppKey[GatewaySettings] = web.AppKey("settings", GatewaySettings)
REGISTRY: web.AppKey[ModelRegistry] = web.AppKey("registry", ModelRegistry)
