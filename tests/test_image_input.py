"""Image input without a model: data-URL decoding, the entry node's checks, prompt marks, catalog and
config of projectors, the projector's VRAM estimate (on a real generated mmproj GGUF)."""

from __future__ import annotations

import base64

import pytest

from aivailable.api.image_input import ImageRef, accepts_images, check_images, image_refs, inline
from aivailable.config import ModelConfig, load_settings
from aivailable.engine.chatplan import plan_chat
from aivailable.engine.media import MediaChunk, MediaPrompt, image_mark, pseudo_token, split_marks
from aivailable.engine.tools import ToolFormat
from aivailable.errors import ConfigError, InvalidRequest
from aivailable.files.catalog import merge
from aivailable.images import ImageError, base64_size, decode_data_url, sniff, url_kind
from aivailable.wire.schemas import parse_request
from tests.mmprojgen import image_tokens, png, write_mmproj

PNG = png(8, 6)
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
GIF = b"GIF89a" + b"\x00" * 20
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 20


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("data, mime", [(PNG, "image/png"), (GIF, "image/gif"), (JPEG, "image/jpeg"),
                                        (b"BM" + b"\x00" * 30, "image/bmp"), (b"RIFF\x00\x00\x00\x00WEBP", None),
                                        (b"<svg", None), (b"", None)])
def test_sniff_by_signature(data, mime):
    assert sniff(data) == mime


def test_decode_data_url_round_trip():
    img = decode_data_url(PNG_URL, 1 << 20)
    assert img.mime == "image/png" and img.data == PNG
    assert decode_data_url(img.data_url(), 1 << 20) == img
    assert len(img.sha256) == 64
    # the declared type may differ from the bytes (clients mislabel JPEGs): the bytes decide
    assert decode_data_url(data_url(JPEG, "image/png"), 1 << 20).mime == "image/jpeg"


@pytest.mark.parametrize("url, words", [
    ("data:image/png,abc", "not base64"),
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64,", "empty"),
    ("data:image/webp;base64," + base64.b64encode(b"RIFFxxxxWEBP").decode(), "unsupported image type 'image/webp'"),
    ("data:text/plain;base64,aGVsbG8=", "image/... type"),
    ("data:;base64,aGVsbG8=", "image/... type"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "not PNG, JPEG, GIF or BMP"),
    ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 2000).decode(), "at most 1024"),
    ("http://example.com/x.png", "not a data URL"),
])
def test_decode_data_url_refuses(url, words):
    with pytest.raises(ImageError, match=None) as err:
        decode_data_url(url, 1024)
    assert words in str(err.value)


def test_base64_size_and_url_kind():
    assert base64_size(base64.b64encode(b"x" * 1000).decode()) == 1000
    assert base64_size(base64.b64encode(b"x" * 1001).decode()) == 1001
    assert [url_kind(u) for u in ("data:x", "HTTP://a", "https://a", "ftp://a", "file:///etc/passwd")] == [
        "data", "http", "http", "other", "other"]


def chat(*contents, role="user"):
    return parse_request("chat", {"model": "m", "messages": [{"role": role, "content": c} for c in contents]})


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_image_refs_name_each_part():
    req = chat("hi", [{"type": "text", "text": "look"}, image(PNG_URL), image("https://x/y.png")])
    refs = image_refs(req)
    assert [(r.param, r.url_param) for r in refs] == [
        ("messages[1].content[1]", "messages[1].content[1].image_url.url"),
        ("messages[1].content[2]", "messages[1].content[2].image_url.url")]
    assert image_refs(chat("no images")) == []


def check(refs, accepts=True, allow_urls=False, max_bytes=1 << 20):
    return check_images(refs, model="m", accepts=accepts, allow_urls=allow_urls, max_bytes=max_bytes)


@pytest.mark.parametrize("refs, kw, param, words", [
    ([ImageRef(0, 1, PNG_URL)], dict(accepts=False), "messages[0].content[1]", "does not accept images"),
    ([ImageRef(0, 0, "https://example.com/a.png")], {}, "messages[0].content[0].image_url.url", "allow_image_urls"),
    ([ImageRef(0, 0, "data:image/png;base64,!!")], {}, "messages[0].content[0].image_url.url", "base64"),
    ([ImageRef(0, 0, data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 5000))], dict(max_bytes=2048),
     "messages[0].content[0].image_url.url", "at most 2048"),
    ([ImageRef(0, 0, "data:image/webp;base64,AAAA")], {}, "messages[0].content[0].image_url.url", "unsupported"),
    ([ImageRef(0, 0, "file:///etc/passwd")], dict(allow_urls=True), "messages[0].content[0].image_url.url",
     "data: URL or an http(s) URL"),
    ([ImageRef(2, 0, PNG_URL, role="assistant")], {}, "messages[2].content[0]", "not in assistant messages"),
    ([ImageRef(0, 0, PNG_URL), ImageRef(0, 1, "data:image/gif;base64,R0lG")], {}, "messages[0].content[1].image_url.url",
     "not PNG"),
])
def test_check_images_refuses_naming_the_part(refs, kw, param, words):
    with pytest.raises(InvalidRequest) as err:
        check(refs, **kw)
    assert err.value.param == param
    assert words in err.value.message


def test_check_images_passes_and_lists_urls_to_fetch():
    assert check([]) == []
    assert check([], accepts=False) == []  # no images: any model
    assert check([ImageRef(0, 0, PNG_URL)]) == []
    web = ImageRef(1, 2, "https://example.com/a.png")
    assert check([ImageRef(0, 0, PNG_URL), web], allow_urls=True) == [web]


def test_inline_replaces_only_the_fetched_parts():
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "https://x/1.png", "detail": "low"}}]}]}
    out = inline(body, {(0, 1): PNG_URL})
    assert out["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}}
    assert body["messages"][0]["content"][1]["image_url"]["url"] == "https://x/1.png"  # not mutated
    assert inline(body, {}) is body


@pytest.mark.parametrize("entry, accepts", [
    ({"name": "m", "path": "/m.gguf"}, False), ({"mmproj": "/p.gguf"}, True),
    ({"mmproj_sha256": "a" * 64}, True), ({"mmproj_source": "hf://o/r/p.gguf"}, True)])
def test_accepts_images(entry, accepts):
    assert accepts_images(entry) is accepts


def test_split_marks_only_this_requests_nonce():
    n = "abc123"
    text = f"look {image_mark(n, 0)} and {image_mark(n, 1)}{image_mark('other', 2)} \ue002abc123:x\ue003"
    assert split_marks(text, n) == ["look ", 0, " and ", 1, f"{image_mark('other', 2)} \ue002abc123:x\ue003"]
    assert split_marks(image_mark(n, 3), n) == [3]
    assert split_marks("", n) == []


def test_plan_marks_images_where_they_were():
    req = chat("system says", [{"type": "text", "text": "A"}, image(PNG_URL), {"type": "text", "text": "B"},
                               image(PNG_URL)])
    plan = plan_chat(req, ToolFormat.GENERIC)
    assert plan.images == [PNG_URL, PNG_URL]
    nonce = plan.image_nonce
    assert len(nonce) == 16
    assert split_marks(plan.messages[1]["content"], nonce) == ["A", 0, "B", 1]
    assert plan.messages[0]["content"] == "system says"
    assert plan_chat(chat("plain"), ToolFormat.GENERIC).images == []


def test_pseudo_tokens_are_negative_and_per_image():
    a, b = pseudo_token("0" * 64), pseudo_token("f" * 64)
    assert a < 0 and b < 0 and a != b
    assert pseudo_token("ab" * 32) == pseudo_token("ab" * 32)


def test_media_prompt_positions():
    c = MediaChunk(handle=0, n_tokens=3, pseudo_token=-7)
    p = MediaPrompt.of([1, 2, c, 4, c, 5])
    assert p.tokens == [1, 2, -7, -7, -7, 4, -7, -7, -7, 5]
    assert p.media == {2: c, 6: c}


def test_config_projector_fields(tmp_path):
    m = ModelConfig(name="v", path="/m.gguf", mmproj="/p.gguf", mmproj_sha256="A" * 64,
                    mmproj_source="hf://o/r/mmproj.gguf")
    assert m.mmproj_sha256 == "a" * 64
    for bad in (dict(mmproj_sha256="xyz"), dict(mmproj_source="https://x/p.gguf"),
                dict(embedding=True, mmproj="/p.gguf")):
        with pytest.raises(ValueError):
            ModelConfig(name="v", path="/m.gguf", **bad)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nallow_image_urls = true\nmax_image_bytes = 2048\n'
                   '[[models]]\nname = "v"\npath = "/m.gguf"\nmmproj = "/p.gguf"\n')
    s = load_settings(str(cfg), {}, [])
    assert s.node.allow_image_urls is True and s.node.max_image_bytes == 2048
    assert s.models[0].mmproj == "/p.gguf"
    assert load_settings(None, {}, []).node.max_body_bytes == 20 << 20
    assert load_settings(None, {}, []).node.allow_image_urls is False
    cfg.write_text('[[models]]\nname = "v"\npath = "/m.gguf"\nmmproj_sha256 = "nothex"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), {}, [])
    assert "models[0].mmproj_sha256" in str(err.value)


def test_catalog_merge_projector_is_node_local_and_shared_by_sha():
    sha_m, sha_p = "1" * 64, "2" * 64
    a = {"name": "v", "path": "/a/m.gguf", "mmproj": "/a/p.gguf", "sha256": sha_m, "mmproj_sha256": sha_p,
         "mmproj_size": 10}
    b = {"name": "v", "path": "/b/m.gguf", "mmproj": "/b/p.gguf"}  # same model, its projector not hashed yet
    catalog, conflicts = merge([("n2", [a]), ("n1", [b])])
    assert conflicts == {}
    assert catalog["v"]["mmproj_sha256"] == sha_p and catalog["v"]["mmproj_size"] == 10
    c = {**a, "mmproj_sha256": "3" * 64}
    _, conflicts = merge([("n1", [a]), ("n2", [c])])
    assert "v" in conflicts
    bad = {**a, "mmproj_sha256": "not-a-sha"}
    catalog, _ = merge([("n1", [bad])])
    assert "v" not in catalog


def test_projector_estimate_from_a_real_mmproj(tmp_path):
    from aivailable.engine.gguf_info import GGUFError
    from aivailable.engine.mmproj_info import projector_mib, read_projector_info

    path = write_mmproj(tmp_path / "p.gguf", n_embd=32, n_ff=64, n_head=2, image_size=64, patch_size=8)
    info = read_projector_info(path)
    assert info.projector_type == "gemma3"
    assert info.n_patches == 64 and info.n_head == 2
    assert 32 * 640 * 4 < info.weight_bytes < path.stat().st_size
    assert info.compute_bytes() == 64 * 64 * 2 * 4 + 8 * 64 * 64 * 4
    assert projector_mib({"mmproj": str(path)}, path) == pytest.approx(info.total_mib())
    assert projector_mib({"name": "x"}, None) == 0.0
    assert projector_mib({"mmproj_sha256": "a" * 64, "mmproj_size": 2 << 20}, None) == pytest.approx(2.1)
    assert image_tokens(64, 8, 2) == 16
    with pytest.raises(GGUFError):
        read_projector_info(tmp_path / "missing.gguf")


def test_is_projector(tmp_path, gemma_path):
    from aivailable.engine.gguf_info import GGUFError
    from aivailable.engine.mmproj_info import is_projector, read_projector_info

    assert is_projector(write_mmproj(tmp_path / "p.gguf"))
    assert not is_projector(gemma_path)
    assert not is_projector(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF junk")
    assert not is_projector(tmp_path / "junk.gguf")
    with pytest.raises(GGUFError, match="not a multimodal projector"):
        read_projector_info(gemma_path)
