"""`aivailable status`: the cluster view of /api/cluster as terminal tables."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def render_status(view: dict, console: Console | None = None) -> None:
    """Print nodes/GPUs and models of a /api/cluster document."""
    console = console or Console()
    console.print(f"node [bold]{view['node_id']}[/]  leader {view.get('leader') or '[red]none[/]'}  "
                  f"term {view.get('term')}")
    for f in view.get("foreign_nodes") or []:
        console.print(f"[yellow]another cluster's node on this network (ignored): {escape(str(f.get('node')))} "
                      f"at {escape(str(f.get('addr')))}[/]")
    gpus = Table(title="GPUs", title_justify="left")
    for col in ("node", "state", "gpu", "name", "VRAM used / total (MiB)", "models"):
        gpus.add_column(col)
    for n in view["nodes"]:
        for g in n["gpus"] or [{"id": "-", "name": "(no GPU)", "vram_used_mib": 0, "vram_total_mib": 0,
                                "models": [], "simulated": False}]:
            name = g["name"] + (" [yellow](simulated)[/]" if g.get("simulated") else "")
            models = ", ".join(f"{m['name']} {m['vram_mib']:.0f}" for m in g.get("models", []))
            name += " [yellow](drained)[/]" if g.get("drained") else ""
            gpus.add_row(n["id"], n["state"] + (" (leaving)" if n.get("leaving") else ""), g["id"], name,
                         f"{g['vram_used_mib']:.0f} / {g['vram_total_mib']:.0f}", models)
    console.print(gpus)
    models = Table(title="Models", title_justify="left")
    for col in ("model", "state", "replicas", "requests", "tok/s", "unload in", "reason"):
        models.add_column(col)
    for m in view["models"]:
        reps = ", ".join(f"{r['node']}:{'+'.join(r['gpus'])} {r['state']}" for r in m["replicas"]) or "-"
        unload = f"{m['unload_in_s']:.0f} s" if m.get("unload_in_s") is not None else (
            "never" if str(m.get("keep_alive", "forever")).startswith("forever") else "-")
        models.add_row(m["name"], m["state"], reps, str(m.get("requests", 0)), f"{m.get('tokens_per_s', 0):.1f}",
                       unload, m.get("reason", ""))
    console.print(models)
    transfers = view.get("transfers") or []
    if transfers:
        xf = Table(title="Model-file transfers", title_justify="left")
        for col in ("node", "model", "state", "progress", "rate", "ETA", "from", "error"):
            xf.add_column(col)
        for t in transfers:
            eta = f"{t['eta_s']:.0f} s" if t.get("eta_s") is not None else "-"
            frm = ", ".join(f"{p} {b / 2**20:.1f} MiB" for p, b in t.get("peers", {}).items()) or "-"
            xf.add_row(t["node"], t["model"], t["state"],
                       f"{t['percent']:.1f}% of {t['size'] / 2**20:.1f} MiB", f"{t.get('rate_mib_s', 0):.1f} MiB/s",
                       eta, frm, t.get("error", ""))
        console.print(xf)
