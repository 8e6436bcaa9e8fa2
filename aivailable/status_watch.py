"""`aivailable status --watch [SECONDS]`: the status tables, redrawn until Ctrl-C."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from rich.console import Console

from aivailable.status_table import render_status


def watch(url: str, every_s: float, *, as_json: bool = False, console: Console | None = None,
          rounds: int | None = None, api_key: str | None = None) -> int:
    """Fetch /api/cluster every `every_s` seconds and redraw (a terminal is cleared first; elsewhere each
    round follows the last). An unreachable node is reported and retried, not fatal. Ctrl-C ends it (0)."""
    console = console or Console()
    every_s = max(0.2, every_s)
    api = url.rstrip("/") + "/api/cluster"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # a node with protect_status
    n = 0
    try:
        while rounds is None or n < rounds:
            n += 1
            try:
                with urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=10) as r:
                    view = json.load(r)
                error = None
            except (urllib.error.URLError, OSError, ValueError) as exc:
                view, error = None, f"cannot read {api}: {exc}"
            if as_json:
                print(json.dumps(view if error is None else {"error": error}), flush=True)
            else:
                if console.is_terminal:
                    console.clear()
                console.print(f"[dim]{time.strftime('%Y-%m-%d %H:%M:%S')}  every {every_s:g} s, Ctrl-C to stop[/]")
                if error is None:
                    render_status(view, console)
                else:
                    console.print(f"[red]{error}[/] (retrying)")
                console.file.flush()
            time.sleep(every_s)
    except KeyboardInterrupt:
        pass
    return 0
