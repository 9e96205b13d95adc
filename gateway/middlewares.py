"""Request ids on every response, and one place that turns every error into the API's JSON error body."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError, MethodNotAllowed, PayloadTooLarge, RouteNotFound
from gateway.state import SETTINGS

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: GatewayError, request_id: str) -> web.Response:
    response = web.json_response(error.body(request_id), status=error.status, headers=error.headers)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


@web.middleware
async def request_id_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    # Echoed back only if it is printable ASCII: anything else would not come back as the same bytes.
    usable = 0 < len(incoming) <= 128 and incoming.isascii() and incoming.isprintable()
    request_id = incoming if usable else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    try:
        response = await handler(request)
    except GatewayError as error:
        return error_response(error, request_id)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return error_response(PayloadTooLarge(f"the request body is over the limit of {limit} bytes"), request_id)
    except web.HTTPNotFound:
        return error_response(RouteNotFound(f"no route for {request.method} {request.path}"), request_id)
    except web.HTTPMethodNotAllowed:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"), request_id)
    except web.HTTPException:
        raise
    except ConnectionResetError:
        # The client is gone: nobody to answer. As a cancellation, aiohttp closes the connection quietly
        # (any other exception it would log as an error and try to send a 500 on the closed connection).
        raise asyncio.CancelledError from None
    except Exception:
        log.exception("unexpected error in request %s", request_id)
        return error_response(GatewayError("internal error; the server log has the details"), request_id)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response
