"""Check the README's Open WebUI recipe end to end (not run in CI: Open WebUI is ~7 GB installed).

    python bench/openwebui_check.py --workdir /tmp/owui-check [--venv /tmp/owui-venv] [--install]

Starts a `--demo` node, a logging proxy in front of it, and Open WebUI (from `--venv`, created and
filled with `pip install open-webui` when `--install` is given) with the README's environment pointed
at the proxy. Then: lists Open WebUI's models, sends a non-streamed and a streamed chat through its API
(`/api/chat/completions`, signed in as WEBUI_AUTH=false's admin), and one chat through its page in
headless Chromium (Debian's /usr/bin/chromium via playwright). Prints every request Open WebUI sent to
the node with its status (and the node's error message for a 4xx/5xx), and writes
bench/results/openwebui_check.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import harness  # noqa: E402
from bench.harness import free_port, start_node  # noqa: E402

CHAT_MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


class LoggingProxy:
    """HTTP proxy to the node on its own thread and loop; records each request and its status."""

    def __init__(self, upstream: str, port: int):
        self.upstream, self.port, self.log = upstream.rstrip("/"), port, []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True).start()
        self._ready.wait(10)

    async def _serve(self) -> None:
        self._session = ClientSession(timeout=ClientTimeout(total=None, sock_read=600))
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await asyncio.Event().wait()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        entry = {"t": round(time.time(), 3), "method": request.method, "path": request.path_qs, **_summary(body)}
        self.log.append(entry)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers=headers) as up:
            entry["status"] = up.status
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")})
            await resp.prepare(request)
            tail = b""
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
                tail = (tail + chunk)[-4096:]
            if up.status >= 400:
                entry["error"] = _error_message(tail)
            await resp.write_eof()
            entry["s"] = round(time.time() - entry["t"], 2)
            return resp


def _summary(body: bytes) -> dict:
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    keys = ("model", "stream", "max_tokens", "max_completion_tokens")
    out = {k: data[k] for k in keys if k in data}
    if "tools" in data:
        out["tools"] = len(data["tools"] or [])
    out["fields"] = sorted(k for k in data if k not in ("messages", "prompt"))
    return out


def _error_message(tail: bytes) -> str:
    text = tail.decode(errors="replace")
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return json.loads(text)["error"]["message"]
    return text[-300:]


def _http(method: str, url: str, body: dict | None = None, token: str | None = None, timeout: float = 300):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    return urllib.request.urlopen(req, timeout=timeout)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s")


def _start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=REPO, start_new_session=True)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def owui_env(base_url: str, data_dir: Path) -> dict[str, str]:
    """The README's environment ("Use it with Open WebUI")."""
    return {"OPENAI_API_BASE_URL": base_url, "OPENAI_API_KEY": "unused", "ENABLE_OLLAMA_API": "false",
            "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "WEBUI_AUTH": "false", "ENABLE_PERSISTENT_CONFIG": "false",
            "TASK_MODEL_EXTERNAL": CHAT_MODEL, "RAG_EMBEDDING_MODEL": "", "DATA_DIR": str(data_dir),
            "DEFAULT_MODELS": CHAT_MODEL, "WEBUI_SECRET_KEY": "openwebui-check"}


def api_checks(owui: str, report: dict) -> None:
    with _http("POST", owui + "/api/v1/auths/signin", {"email": "", "password": ""}) as r:
        token = json.load(r)["token"]
    with _http("GET", owui + "/api/models", token=token) as r:
        report["models"] = sorted(m["id"] for m in json.load(r)["data"])
    print("Open WebUI lists:", report["models"])
    msgs = [{"role": "user", "content": QUESTION}]
    t0 = time.monotonic()
    try:
        with _http("POST", owui + "/api/chat/completions", {"model": CHAT_MODEL, "messages": msgs, "stream": False},
                   token=token) as r:
            body = json.load(r)
        report["api_chat"] = {"ok": True, "s": round(time.monotonic() - t0, 1),
                              "answer": body["choices"][0]["message"]["content"],
                              "finish_reason": body["choices"][0].get("finish_reason")}
    except urllib.error.HTTPError as exc:
        report["api_chat"] = {"ok": False, "status": exc.code, "body": exc.read().decode(errors="replace")[:500]}
    print("API chat:", report["api_chat"])
    t0, parts, finish = time.monotonic(), [], None
    try:
        with _http("POST", owui + "/api/chat/completions", {"model": CHAT_MODEL, "messages": msgs, "stream": True},
                   token=token) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                for c in ev.get("choices") or []:
                    parts.append((c.get("delta") or {}).get("content") or "")
                    finish = c.get("finish_reason") or finish
        report["api_stream"] = {"ok": True, "s": round(time.monotonic() - t0, 1), "answer": "".join(parts),
                                "finish_reason": finish}
    except urllib.error.HTTPError as exc:
        report["api_stream"] = {"ok": False, "status": exc.code, "body": exc.read().decode(errors="replace")[:500]}
    print("API stream:", report["api_stream"])


def page_check(owui: str, proxy: LoggingProxy, workdir: Path, report: dict, timeout_s: float) -> None:
    from playwright.sync_api import sync_playwright

    seen = len(proxy.log)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(owui + "/", wait_until="domcontentloaded", timeout=120_000)  # socket.io never idles
        box = page.locator("#chat-input")
        box.wait_for(timeout=120_000)
        try:
            box.click(timeout=10_000)
        except Exception:  # a first-start dialog (what's new) over the page: close it
            page.keyboard.press("Escape")
            box.click(timeout=10_000, force=True)
        page.keyboard.type(QUESTION)
        page.keyboard.press("Enter")
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline:
            chats = [e for e in proxy.log[seen:] if e["path"].endswith("/chat/completions")]
            done = [e for e in chats if "s" in e]
            if chats and len(done) == len(chats) and time.time() > 5 + max(e["t"] + e["s"] for e in done):
                break
            time.sleep(1)
        with contextlib.suppress(Exception):
            text = page.locator("#response-content-container").last.inner_text(timeout=5_000)
        if not text:
            text = page.locator("body").inner_text()[-1500:]
        shot = workdir / "openwebui_page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    page_requests = [e for e in proxy.log[seen:] if e["path"].endswith("/chat/completions")]
    report["page"] = {"shown": text.strip()[-1500:], "screenshot": str(shot),
                      "ok": bool(page_requests) and all(e.get("status") == 200 for e in page_requests)}
    print("Page shows:", report["page"]["shown"][-500:])


def ensure_venv(venv: Path, install: bool) -> Path:
    exe = venv / "bin" / "open-webui"
    if exe.exists():
        return exe
    if not install:
        raise SystemExit(f"no Open WebUI in {venv}: pass --install to create it (about 7 GB), or --venv")
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "open-webui"], check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/owui-check"))
    ap.add_argument("--venv", type=Path, default=Path("/tmp/owui-venv"), help="Open WebUI's virtual environment")
    ap.add_argument("--install", action="store_true", help="create --venv and pip install open-webui into it")
    ap.add_argument("--page-timeout", type=float, default=300.0, help="seconds to wait for the page's chat")
    ap.add_argument("--no-page", action="store_true", help="skip the browser check")
    harness.add_output_args(ap, "openwebui_check")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    exe = ensure_venv(args.venv, args.install)
    node_port, proxy_port, owui_port = free_port(), free_port(), free_port()
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    node = owui = None
    proxy = LoggingProxy(f"http://127.0.0.1:{node_port}", proxy_port)
    try:
        node = start_node(args.workdir, "--demo", port=node_port, name="node")  # node-state/, node.log
        node.wait_healthy(300)
        proxy.start()
        owui = _start([str(exe), "serve", "--host", "127.0.0.1", "--port", str(owui_port)], args.workdir / "owui.log",
                      owui_env(f"http://127.0.0.1:{proxy_port}/v1", args.workdir / "owui-data"))
        t0 = time.monotonic()
        _wait_http(f"http://127.0.0.1:{owui_port}/health", owui, 900, "Open WebUI")
        report["owui_start_s"] = round(time.monotonic() - t0, 1)
        print(f"Open WebUI up in {report['owui_start_s']} s")
        api_checks(f"http://127.0.0.1:{owui_port}", report)
        if not args.no_page:
            try:
                page_check(f"http://127.0.0.1:{owui_port}", proxy, args.workdir, report, args.page_timeout)
            except Exception as exc:  # the report still says what the node saw
                report["page"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                print("Page check failed:", report["page"]["error"])
    finally:
        _stop(owui)
        _stop(node.proc if node else None)
        report["requests"] = proxy.log
        print(f"\n{'method':6} {'status':6} {'s':>6}  path / model / stream / max_tokens / tools / error")
        for e in proxy.log:
            extra = " ".join(f"{k}={e[k]}" for k in ("model", "stream", "max_tokens", "tools") if k in e)
            print(f"{e['method']:6} {e.get('status', '-')!s:6} {e.get('s', '-')!s:>6}  {e['path']} {extra}"
                  + (f"  ERROR: {e['error']}" if "error" in e else ""))
        print(f"\nwrote {harness.write_results('openwebui_check', report, args=args, indent=2)}")
    ok = all(report.get(k, {}).get("ok") for k in ("api_chat", "api_stream")) and CHAT_MODEL in report.get("models", [])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
