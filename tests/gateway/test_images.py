"""Fetching request images safely, against a real HTTP server on loopback: the SSRF policy (loopback and
private addresses refused unless allowed, redirects re-checked), size, time, type and pixel limits."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image as PilImage

from gateway.errors import InvalidRequest
from gateway.image_formats import sniff
from gateway.images import ImagePolicy, ImageRefused, load_image, load_images
from tests.gateway.conftest import MODEL, GatewayThread, gateway_settings, model_entry
from triton_models.launcher import EmbeddedTriton, free_port

LOOPBACK_ONLY = ImagePolicy.from_strings(["127.0.0.1/32"], max_bytes=1 << 20, max_pixels=4_000_000, timeout_s=1.0)


def _encoded(kind: str, size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    PilImage.new("RGB", size, (200, 30, 60)).save(buffer, format=kind)
    return buffer.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny valid PNG header that claims width x height pixels (with a few bytes of compressed data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    )


@dataclass
class ImageServer:
    port: int
    fetched: list[str]  # the paths requested so far

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    port = free_port()
    png, big = _encoded("PNG"), _encoded("PNG", (2000, 1500))

    fetched: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        fetched.append(request.path)
        return await handler(request)  # type: ignore[no-any-return]

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=png, content_type="image/png")

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=big + b"\0" * (2 << 20), content_type="image/png")

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        await response.write(png[:10])
        await asyncio.sleep(5)
        return response

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html></html>", content_type="text/html")

    async def lying(request: web.Request) -> web.Response:
        return web.Response(body=_encoded("JPEG"), content_type="image/png")

    async def bomb(request: web.Request) -> web.Response:
        return web.Response(body=_png_bomb(100_000, 100_000), content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        # The Location as given, parseable or not (HTTPFound would refuse a malformed one).
        return web.Response(status=302, headers={"Location": request.query["to"]})

    app = web.Application(middlewares=[record])
    for path, handler in (("/image.png", image), ("/large", large), ("/slow", slow), ("/html", html),
                          ("/lying", lying), ("/bomb", bomb), ("/redirect", redirect)):  # fmt: skip
        app.router.add_get(path, handler)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    # Every loopback address: 127.0.0.2 is another "host" the policy has not allowed.
    loop.run_until_complete(web.TCPSite(runner, "0.0.0.0", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield ImageServer(port, fetched)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _refusal(url: str, policy: ImagePolicy = LOOPBACK_ONLY, index: int = 0) -> str:
    with pytest.raises(ImageRefused) as refused:
        asyncio.run(load_image(index, url, policy))
    assert refused.value.param == f"images[{index}].image_url"
    return refused.value.message


def test_an_allowed_url_is_fetched_and_checked(server: ImageServer) -> None:
    image = asyncio.run(load_image(0, server.url("/image.png"), LOOPBACK_ONLY))
    assert (image.info.format, image.info.width, image.info.height) == ("png", 32, 24)


def test_loopback_and_private_addresses_are_refused_by_default(server: ImageServer) -> None:
    default = ImagePolicy()
    assert "127.0.0.1 is a loopback address" in _refusal(server.url("/image.png"), default)
    assert "it resolves to 127.0.0.1 is a loopback address" in _refusal(server.url("/image.png", "localhost"), default)
    for url, kind in (
        ("http://10.1.2.3/x.png", "private"),
        ("http://192.168.0.1/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/x.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://[2002:7f00:1::]/x.png", "loopback"),  # 6to4 around 127.0.0.1
        ("http://[64:ff9b::a9fe:a9fe]/x.png", "link-local"),  # NAT64 around 169.254.169.254
        ("http://0.0.0.0/x.png", "unspecified"),
    ):
        assert kind in _refusal(url, default), url


def test_a_redirect_to_a_refused_address_is_refused(server: ImageServer) -> None:
    to_other_loopback = server.url("/image.png", host="127.0.0.2")
    message = _refusal(server.url(f"/redirect?to={to_other_loopback}"))
    assert "127.0.0.2 is a loopback address" in message
    # A redirect the policy allows is followed.
    image = asyncio.run(load_image(0, server.url(f"/redirect?to={server.url('/image.png')}"), LOOPBACK_ONLY))
    assert image.info.format == "png"
    loop_url = server.url("/redirect?to=/redirect%3Fto%3D/redirect%253Fto%253D/redirect%25253Fto%25253D/image.png")
    assert "more than 3 redirects" in _refusal(loop_url)
    # A redirect to a URL that cannot be parsed (it was a 500, found by review).
    assert "a redirect to an unusable URL 'http://[::1'" in _refusal(server.url("/redirect?to=http://%5B::1"))


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/large", "larger than 1048576 bytes"),
        ("/slow", "did not arrive within 1 s"),
        ("/html", "'text/html', not an image type"),
        ("/lying", "declared as image/png but the data is image/jpeg"),
        ("/bomb", "100000x100000 pixels is more than the 4000000 allowed"),
        ("/missing", "answered HTTP 404"),
    ],
)
def test_oversize_slow_wrong_type_and_bomb_images_are_refused(server: ImageServer, path: str, reason: str) -> None:
    assert reason in _refusal(server.url(path))


def test_data_urls_in_every_accepted_format(server: ImageServer) -> None:
    for kind, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        data = _encoded(kind, (40, 30))
        url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        image = asyncio.run(load_image(0, url, LOOPBACK_ONLY))
        assert (image.info.width, image.info.height, image.data) == (40, 30, data), kind
    # Lossless and extended WebP headers too.
    for options in ({"lossless": True}, {"exif": b"Exif\0\0"}):
        buffer = io.BytesIO()
        PilImage.new("RGB", (17, 9)).save(buffer, format="WEBP", **options)
        assert (sniff(buffer.getvalue()).width, sniff(buffer.getvalue()).height) == (17, 9), options


def test_bad_data_urls_are_refused_with_the_reason() -> None:
    png = base64.b64encode(_encoded("PNG")).decode()
    assert "base64 is not valid" in _refusal(f"data:image/png;base64,{png[:-3]}!!")
    assert "'image/gif' is not one of" in _refusal(f"data:image/gif;base64,{png}")
    assert "not a PNG, JPEG or WebP" in _refusal("data:image/png;base64," + base64.b64encode(b"hello").decode())
    assert "without a ','" in _refusal("data:image/png;base64")
    assert "must be an http(s) URL or a data: URL" in _refusal("ftp://example.com/x.png")
    bomb = base64.b64encode(_png_bomb(50_000, 50_000)).decode()
    assert "decompression bomb" in _refusal(f"data:image/png;base64,{bomb}")


def test_malformed_urls_are_refused_not_crashed_on() -> None:
    # Each was a 500 (an exception from URL parsing or IDNA encoding), found by review.
    assert "Invalid IPv6 URL" in _refusal("http://[::1/x.png", ImagePolicy())
    assert "does not resolve" in _refusal("http://" + "a" * 64 + ".example.com/x.png", ImagePolicy())


def test_the_number_of_images_is_bounded_and_refusals_name_the_image(server: ImageServer) -> None:
    png = "data:image/png;base64," + base64.b64encode(_encoded("PNG")).decode()
    with pytest.raises(InvalidRequest, match="at most 2 images") as refused:
        asyncio.run(load_images([png] * 3, ImagePolicy(max_images=2)))
    assert refused.value.param == "images"
    assert len(asyncio.run(load_images([png, png], ImagePolicy(max_images=2)))) == 2
    with pytest.raises(ImageRefused) as second:
        asyncio.run(load_images([png, "data:image/png;base64,AAAA"], ImagePolicy()))
    assert second.value.param == "images[1].image_url" and second.value.message.startswith("images[1]: ")


def test_a_model_without_images_refuses_them_before_fetching_any(
    server: ImageServer, reference_triton: EmbeddedTriton, reference_checkpoint: Path
) -> None:
    entry = model_entry(reference_checkpoint, reference_triton.grpc_url)  # SmolLM2: text only
    settings = gateway_settings([entry], image_fetch_allowed_networks=["127.0.0.1/32"])  # the URL would be fetched
    body = {"model": MODEL, "prompt": "Describe", "images": [{"image_url": server.url("/image.png")}]}

    async def post(url: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.post(f"{url}/v4/completions", json=body) as response:
            return response.status, await response.json()

    fetched_before = len(server.fetched)
    with GatewayThread(settings) as running:
        status, answer = asyncio.run(post(running.url))
    assert status == 400 and answer["error"]["param"] == "images", answer
    assert "does not accept images" in answer["error"]["message"]
    assert len(server.fetched) == fetched_before  # the image was never requested
