"""Which image parts a chat request carries and whether this model and node accept them.

Everything here is pure except `fetch_images`, the one I/O step (only with `allow_image_urls`).

The entry node checks every image before it routes anything: a model without a multimodal projector
(`mmproj`) answers 400 "does not accept images"; a data: URL must decode to a PNG/JPEG/GIF/BMP of at most
`max_image_bytes`; an http(s) URL is fetched by the entry node only with `allow_image_urls` on (then
replaced by the fetched bytes as a data: URL, so replicas never fetch anything). Each 400 names the part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aivailable.errors import InvalidRequest
from aivailable.images import ImageError, decode_data_url, fetch, url_kind

IMAGE_ROLES = frozenset({"user", "system", "developer"})


@dataclass(frozen=True)
class ImageRef:
    message: int
    part: int
    url: str
    role: str = "user"

    @property
    def param(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"

    @property
    def url_param(self) -> str:
        return f"{self.param}.image_url.url"


def image_refs(req: Any) -> list[ImageRef]:
    """The image parts of a validated ChatCompletionRequest, in order."""
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            out += [ImageRef(i, j, p.image_url.url, m.role) for j, p in enumerate(m.content) if p.type == "image_url"]
    return out


def accepts_images(entry: Mapping[str, Any]) -> bool:
    """Whether catalog model `entry` has a multimodal projector (configured, known by sha256 or a source)."""
    return bool(entry.get("mmproj") or entry.get("mmproj_sha256") or entry.get("mmproj_source"))


def check_images(refs: list[ImageRef], *, model: str, accepts: bool, allow_urls: bool,
                 max_bytes: int) -> list[ImageRef]:
    """Raise InvalidRequest for the first unusable image; return the http(s) ones the node must fetch."""
    if not refs:
        return []
    if not accepts:
        raise InvalidRequest(f"model {model!r} does not accept images (it has no multimodal projector; "
                             "configure mmproj for it)", param=refs[0].param)
    to_fetch = []
    for r in refs:
        if r.role not in IMAGE_ROLES:
            raise InvalidRequest(f"'{r.param}': images are accepted in user and system messages, not in "
                                 f"{r.role} messages", param=r.param)
        kind = url_kind(r.url)
        if kind == "data":
            try:
                decode_data_url(r.url, max_bytes)
            except ImageError as exc:
                raise InvalidRequest(f"Invalid image in '{r.url_param}': {exc}.", param=r.url_param) from None
        elif kind == "http":
            if not allow_urls:
                raise InvalidRequest(
                    f"'{r.url_param}': this node does not fetch image URLs (allow_image_urls is off); send the "
                    "image inline as a data: URL (data:image/png;base64,...)", param=r.url_param)
            to_fetch.append(r)
        else:
            raise InvalidRequest(f"'{r.url_param}' must be a data: URL or an http(s) URL", param=r.url_param)
    return to_fetch


def inline(body: dict, fetched: Mapping[tuple[int, int], str]) -> dict:
    """`body` (a chat request as a dict) with the image URL of each (message, part) replaced by a data URL."""
    if not fetched:
        return body
    messages = list(body["messages"])
    for (i, j), data_url in fetched.items():
        msg = dict(messages[i])
        parts = list(msg["content"])
        part = dict(parts[j])
        part["image_url"] = {**part["image_url"], "url": data_url}
        parts[j] = part
        msg["content"] = parts
        messages[i] = msg
    return {**body, "messages": messages}


async def fetch_images(refs: list[ImageRef], max_bytes: int) -> dict[tuple[int, int], str]:
    """Fetch each http(s) image (the node's one I/O step here); a failure is a 400 naming the part."""
    out = {}
    for r in refs:
        try:
            out[(r.message, r.part)] = (await fetch(r.url, max_bytes)).data_url()
        except ImageError as exc:
            raise InvalidRequest(f"'{r.url_param}': {exc}", param=r.url_param) from None
    return out
