"""VRAM one replica of a model file needs, per KV cache type, kept in the node's disposable cache.

The figures are engine/kvcache.py's (engine/estimate.py underneath), read from the file's GGUF metadata;
the cache key holds the file's resolved path, size and mtime, so a changed file is estimated afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path

import diskcache

log = logging.getLogger("aivailable.node")

__all__ = ["need_mib", "needs_by_kv_type"]


def needs_by_kv_type(cache: diskcache.Cache, path: Path, ctx: int, parallel: int, kv_setting: str | None, *,
                     on_cpu: bool) -> dict[str, float]:
    """MiB one replica needs with each KV cache type its setting allows, best first ("auto": only the types
    the model supports; a type set outright is estimated anyway, and its worker says why it cannot load)."""
    from aivailable.engine import kvcache

    kinds = kvcache.candidates(kvcache.resolve(kv_setting))
    out = {}
    for kv in kinds:
        try:
            out[kv] = need_mib(cache, path, ctx, parallel, kv, on_cpu=on_cpu, check=len(kinds) > 1)
        except kvcache.UnsupportedKvType:
            continue
    return out


def need_mib(cache: diskcache.Cache, path: Path, ctx: int, parallel: int, kv: str = "f16", *, on_cpu: bool,
             check: bool = False) -> float:
    """MiB one replica needs with KV cache type `kv`; with `check`, UnsupportedKvType where the model cannot
    have that type."""
    from aivailable.engine import kvcache
    from aivailable.engine.gguf_info import read_model_info

    st = path.stat()
    key = ("estimate", str(path.resolve()), st.st_size, st.st_mtime_ns, ctx, parallel, on_cpu)
    key += (kv,) if kv != "f16" else ()
    cached = cache.get(key)
    if cached is not None:
        return float(cached)
    info = read_model_info(path)
    why = kvcache.unsupported(info, kv) if check else None
    if why:
        raise kvcache.UnsupportedKvType(why)
    need = kvcache.estimate_for(info, kv, n_ctx=ctx, n_parallel=parallel, on_cpu=on_cpu).total_mib
    try:
        cache.set(key, need)
    except Exception as exc:  # only a cache: serve on, but tell the operator
        log.warning("cannot write the node cache %s (%s); estimates are recomputed on restart",
                    cache.directory, exc)
    return need
