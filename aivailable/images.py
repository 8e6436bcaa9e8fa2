"""Image bytes from what clients send: data: URLs decoded, http(s) URLs fetched, formats recognised.

llama.cpp's multimodal library decodes images with stb_image, which reads PNG, JPEG, GIF and BMP; a format
it cannot read (WebP, AVIF, SVG, ...) is refused here, by the bytes' signature, before any worker sees it.
Everything but `fetch` is pure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
SUPPORTED_MIME = frozenset({"image/png", "image/jpeg", "image/jpg", "image/gif", "image/bmp"})
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


class ImageError(ValueError):
    """Why an image cannot be used; the caller turns it into a 400 naming the field."""


@dataclass(frozen=True)
class Image:
    mime: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode()}"


def sniff(data: bytes) -> str | None:
    """The image format of `data` by its signature (a supported MIME type), or None."""
    for magic, mime in SIGNATURES:
        if data.startswith(magic):
            return mime
    return None


def _supported(data: bytes, declared: str | None) -> Image:
    mime = sniff(data)
    if mime is None:
        shown = f" (declared {declared})" if declared else ""
        raise ImageError(f"the image is not PNG, JPEG, GIF or BMP{shown}; convert it to one of those")
    return Image(mime, data)


def base64_size(payload: str) -> int:
    """Decoded size of a base64 payload, without decoding it."""
    n = len(payload.rstrip("="))
    return n * 3 // 4


def decode_data_url(url: str, max_bytes: int) -> Image:
    """The image of a `data:image/...;base64,...` URL; ImageError says what is wrong with it."""
    m = _DATA_URL.match(url)
    if m is None:
        raise ImageError("not a data URL (expected data:image/<type>;base64,<data>)")
    mime = (m.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise ImageError(f"the data URL's type is {mime or 'missing'!r}; an image/... type is needed")
    if mime not in SUPPORTED_MIME:
        raise ImageError(f"unsupported image type {mime!r} (supported: png, jpeg, gif, bmp)")
    if not m.group("b64"):
        raise ImageError("the data URL is not base64-encoded (expected ;base64,)")
    payload = url[m.end():]
    if base64_size(payload) > max_bytes:
        raise ImageError(f"the image is {base64_size(payload)} bytes; at most {max_bytes} are accepted")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data URL's payload is not valid base64") from None
    if not data:
        raise ImageError("the image is empty")
    return _supported(data, mime)


def url_kind(url: str) -> str:
    """"data", "http" (http:// or https://) or "other"."""
    low = url[:8].lower()
    if low.startswith("data:"):
        return "data"
    if low.startswith(("http://", "https://")):
        return "http"
    return "other"


async def fetch(url: str, max_bytes: int, timeout_s: float = 20.0) -> Image:
    """GET an image URL (at most `max_bytes`, within `timeout_s`); ImageError on any failure."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, \
                session.get(url, allow_redirects=True, max_redirects=3) as resp:
            if resp.status != 200:
                raise ImageError(f"fetching the image URL gave HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise ImageError(f"the image is {resp.content_length} bytes; at most {max_bytes} are accepted")
            data = bytearray()
            async for block in resp.content.iter_chunked(1 << 16):
                data += block
                if len(data) > max_bytes:
                    raise ImageError(f"the image is over {max_bytes} bytes; at most {max_bytes} are accepted")
    except ImageError:
        raise
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ImageError(f"cannot fetch the image URL: {type(exc).__name__}: {exc}"[:300]) from None
    return _supported(bytes(data), resp.headers.get("Content-Type"))
