"""Getting a request's images safely: `data:` URLs decoded, http(s) URLs fetched under a strict policy.

A URL is an instruction to make the gateway connect somewhere, so (server-side request forgery):
- every address a host name resolves to is checked, and the connection goes to exactly the checked
  addresses (no second lookup that DNS rebinding could answer differently); IP literals are checked too;
- loopback, private, link-local (cloud metadata at 169.254.169.254), shared, multicast, reserved and
  unspecified addresses are refused unless a configured network allows them;
- redirects are followed by hand, each hop checked the same way, at most `max_redirects`;
- the body is read up to a size cap, the whole fetch (redirects included) within a time cap;
- the response's declared type and its real format must both be PNG, JPEG or WebP, and the pixel count is
  bounded before anything decodes it (decompression bombs).
Every refusal is a 400 that names the image (`images[i].image_url`) and the reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from gateway.errors import InvalidRequest
from gateway.image_formats import MIME_TYPES, ImageFormatError, ImageInfo, sniff

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ImagePolicy:
    max_images: int = 8
    max_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_networks: tuple[IpNetwork, ...] = ()  # fetched even though private or loopback

    @classmethod
    def from_strings(cls, allowed_networks: Sequence[str] = (), **limits: Any) -> ImagePolicy:
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        return cls(allowed_networks=networks, **limits)


@dataclass(frozen=True)
class Image:
    data: bytes
    info: ImageInfo


class ImageRefused(InvalidRequest):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"images[{index}]: {reason}", param=f"images[{index}].image_url")


async def load_images(urls: Sequence[str], policy: ImagePolicy) -> list[Image]:
    """Every image of a request, checked; the first refusal ends it."""
    if len(urls) > policy.max_images:
        raise InvalidRequest(f"at most {policy.max_images} images per request, not {len(urls)}", param="images")
    try:
        # A task group: the first refusal cancels the other fetches instead of leaving them running.
        async with asyncio.TaskGroup() as group:
            loads = [group.create_task(load_image(index, url, policy)) for index, url in enumerate(urls)]
    except* ImageRefused as refused:
        raise refused.exceptions[0] from None
    return [load.result() for load in loads]


async def load_image(index: int, url: str, policy: ImagePolicy) -> Image:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _decode_data_url(index, url, policy)
        declared = url[5:].split(",", 1)[0].split(";", 1)[0].strip().lower()
    elif scheme in ("http", "https"):
        try:
            async with asyncio.timeout(policy.timeout_s):
                data, declared = await _fetch(index, url, policy)
        except TimeoutError:
            raise ImageRefused(index, f"the image did not arrive within {policy.timeout_s:g} s") from None
    else:
        raise ImageRefused(index, "image_url must be an http(s) URL or a data: URL")
    return Image(data, _check_image(index, data, declared, policy))


def _decode_data_url(index: int, url: str, policy: ImagePolicy) -> bytes:
    header, separator, payload = url[5:].partition(",")
    if not separator:
        raise ImageRefused(index, "a data: URL without a ',' before its data")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise ImageRefused(index, f"the image is larger than {policy.max_bytes} bytes")
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageRefused(index, "the data: URL's base64 is not valid") from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > policy.max_bytes:
        raise ImageRefused(index, f"the image is larger than {policy.max_bytes} bytes")
    return data


def _check_image(index: int, data: bytes, declared: str, policy: ImagePolicy) -> ImageInfo:
    if declared not in MIME_TYPES.values():
        raise ImageRefused(index, f"type {declared or 'unknown'!r} is not one of {sorted(MIME_TYPES.values())}")
    try:
        info = sniff(data)
    except ImageFormatError as error:
        raise ImageRefused(index, f"not a readable image: {error}") from None
    if info.mime_type != declared:
        raise ImageRefused(index, f"declared as {declared} but the data is {info.mime_type}")
    if info.pixels > policy.max_pixels:
        raise ImageRefused(
            index,
            f"{info.width}x{info.height} pixels is more than the {policy.max_pixels} allowed (a decompression bomb?)",
        )
    return info


# ---- fetching -------------------------------------------------------------------------------------------


# IPv6 forms that carry an IPv4 address a gateway may reach through them: NAT64's well-known prefix (RFC 6052).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, 6to4 or NAT64 address: judged as that address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _refusal_for(address: IpAddress, policy: ImagePolicy) -> str | None:
    """Why the gateway must not connect to this address, or None."""
    if isinstance(address, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(address)) is not None:
        address = embedded
    if any(address in network for network in policy.allowed_networks):
        return None
    for kind, flagged in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local (cloud metadata lives there)", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not globally reachable", not address.is_global),
    ):
        if flagged:
            return f"{address} is a {kind} address" if kind != "not globally reachable" else f"{address} is {kind}"
    return None


class _PinnedResolver(AbstractResolver):
    """Answers only with addresses that were resolved and checked beforehand: the connection goes there."""

    def __init__(self) -> None:
        self.pinned: dict[str, list[ResolveResult]] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            return [{**result, "port": port} for result in self.pinned[host]]
        except KeyError:
            raise OSError(f"{host} was not checked") from None

    async def close(self) -> None:
        return None


async def _vet(index: int, url: str, policy: ImagePolicy, resolver: _PinnedResolver) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as error:  # e.g. an unclosed IPv6 bracket
        raise ImageRefused(index, f"cannot fetch {url[:200]!r}: {error}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ImageRefused(index, f"cannot fetch {url[:200]!r}: only http(s) URLs with a host")
    try:
        literal: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        reason = _refusal_for(literal, policy)
        if reason:
            raise ImageRefused(index, f"refused to fetch from {host}: {reason}")
        return  # aiohttp connects to literals directly
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):  # UnicodeError: a name IDNA cannot encode (e.g. a label over 63)
        raise ImageRefused(index, f"the host {host!r} does not resolve") from None
    results: list[ResolveResult] = []
    for family, _, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        reason = _refusal_for(address, policy)
        if reason:
            raise ImageRefused(index, f"refused to fetch from {host}: it resolves to {reason}")
        results.append(
            {"hostname": host, "host": str(address), "port": 0, "family": family, "proto": proto, "flags": 0}
        )
    resolver.pinned[host] = results


async def _fetch(index: int, url: str, policy: ImagePolicy) -> tuple[bytes, str]:
    resolver = _PinnedResolver()
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=1)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        for _ in range(policy.max_redirects + 1):
            await _vet(index, url, policy, resolver)
            try:
                async with session.get(url, allow_redirects=False) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        location = response.headers.get("Location")
                        if not location:
                            raise ImageRefused(index, f"a redirect ({response.status}) without a Location")
                        try:
                            url = urljoin(url, location)
                        except ValueError:  # e.g. "http://[::1": the first URL is vetted for this, redirects too
                            raise ImageRefused(index, f"a redirect to an unusable URL {location[:200]!r}") from None
                        continue
                    if response.status != 200:
                        raise ImageRefused(index, f"fetching it answered HTTP {response.status}")
                    declared = response.content_type.lower()
                    if declared not in MIME_TYPES.values():
                        raise ImageRefused(index, f"the server sent {declared!r}, not an image type we accept")
                    if (response.content_length or 0) > policy.max_bytes:
                        raise ImageRefused(index, f"the image is larger than {policy.max_bytes} bytes")
                    data = bytearray()
                    async for chunk in response.content.iter_chunked(1 << 16):
                        data += chunk
                        if len(data) > policy.max_bytes:
                            raise ImageRefused(index, f"the image is larger than {policy.max_bytes} bytes")
                    return bytes(data), declared
            except aiohttp.ClientError as error:
                raise ImageRefused(index, f"could not fetch it ({type(error).__name__})") from None
        raise ImageRefused(index, f"more than {policy.max_redirects} redirects")
