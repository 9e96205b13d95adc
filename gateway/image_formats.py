"""What an image is, from its first bytes: format and pixel size, without decoding it.

The gateway checks images before anything decodes them: the declared type must be the real one, and the
pixel count is bounded (a few kilobytes of PNG can claim gigapixels: a decompression bomb). Only PNG,
JPEG and WebP are accepted, the formats vision models' processors read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageFormatError(ValueError):
    pass


@dataclass(frozen=True)
class ImageInfo:
    format: str  # png | jpeg | webp
    width: int
    height: int

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.format]

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sniff(data: bytes) -> ImageInfo:
    """Format and size from the header; ImageFormatError says why not."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    raise ImageFormatError("not a PNG, JPEG or WebP image")


def _png(data: bytes) -> ImageInfo:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageFormatError("a PNG without its IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return _checked("png", width, height)


# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other segments in the same range.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes) -> ImageInfo:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ImageFormatError("a JPEG with a damaged segment structure")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _JPEG_SOF:
            if position + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return _checked("jpeg", width, height)
        if marker == 0xDA or length < 2:  # image data before any frame header
            break
        position += 2 + length
    raise ImageFormatError("a JPEG without a frame header")


def _webp(data: bytes) -> ImageInfo:
    chunk = data[12:16]
    body = data[20:]
    if chunk == b"VP8 " and len(body) >= 10 and body[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", body[6:10])
        return _checked("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and len(body) >= 5 and body[0] == 0x2F:
        (bits,) = struct.unpack("<I", body[1:5])
        return _checked("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(body) >= 10:
        width = int.from_bytes(body[4:7], "little") + 1
        height = int.from_bytes(body[7:10], "little") + 1
        return _checked("webp", width, height)
    raise ImageFormatError("a WebP image with an unknown or damaged header")


def _checked(kind: str, width: int, height: int) -> ImageInfo:
    if width < 1 or height < 1:
        raise ImageFormatError(f"a {kind.upper()} image of {width}x{height} pixels")
    return ImageInfo(kind, width, height)
