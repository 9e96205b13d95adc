"""The URL map."""

from __future__ import annotations

from aiohttp import web

from gateway import admin_api, usage_api, views


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v4/completions", views.create_completion)
    app.router.add_get("/v4/models", views.list_models)
    app.router.add_get("/v4/usage", usage_api.get_usage)
    app.router.add_get("/v4/admin/adapters", admin_api.list_adapters)
    app.router.add_post("/v4/admin/adapters", admin_api.register_adapter)
    app.router.add_delete("/v4/admin/adapters/{custom_id}", admin_api.remove_adapter)
    app.router.add_get("/metrics", views.metrics)
    app.router.add_get("/openapi.json", views.openapi)
    app.router.add_get("/healthz", views.healthz)
    app.router.add_get("/readyz", views.readyz)
