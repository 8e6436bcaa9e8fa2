"""What the manager tells a worker process to run: one model on given GPU(s)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingDefaults(BaseModel):
    """A model's sampling for requests that leave a parameter unset (TOML `sampling = {...}`);
    unset here: llama.cpp's server defaults (engine.runner)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)

    def fill(self, params: Any) -> Any:
        """Set each of these defaults on `params` (a GenParams) where the request left it None."""
        for name, value in self.model_dump(exclude_none=True).items():
            if getattr(params, name) is None:
                setattr(params, name, value)
        return params


class WorkerSpec(BaseModel):
    """Everything a worker needs; passed as JSON on its command line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    path: str
    n_ctx: int = Field(ge=64)
    parallel: int = Field(default=1, ge=1)
    n_threads: int = Field(ge=1)
    n_batch: int = Field(default=512, ge=1)
    embedding: bool = False
    device_ids: tuple[str, ...] = ()
    simulated: bool = True
    """True: run on the CPU (an operator-declared simulated GPU); False: every layer must offload."""
    tensor_split: tuple[float, ...] | None = None
    chat_format: str | None = None
    """Override the chat template choice (a built-in template name); None = GGUF's own, else by architecture."""
    max_queue: int = Field(default=16, ge=0)
    max_tokens_default: int | None = Field(default=None, ge=1)
    """Tokens generated when a request sets no max_tokens (None: until the slot's context ends)."""
    max_tokens_ceiling: int | None = Field(default=None, ge=1)
    """Most tokens one request may generate; a larger max_tokens is clamped (None: the slot's context)."""
    sampling: SamplingDefaults = SamplingDefaults()
    mmproj: str | None = None
    """The multimodal projector GGUF (engine/media.py); None: the model takes no images."""
    socket: str
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    """How the context stores K and V (engine/kvcache.py); quantized types run with flash attention."""

    def token_limit(self, asked: int | None) -> int | None:
        """The generation limit for a request that asked for `asked` tokens (None: it set none).

        The engine further bounds it by what is left of the slot's context after the prompt."""
        return generation_limit(asked, self.max_tokens_default, self.max_tokens_ceiling)


def generation_limit(asked: int | None, default: int | None, ceiling: int | None) -> int | None:
    """Tokens a request may generate: what it asked, else `default`, clamped to `ceiling`
    (None anywhere: no bound from that side; None in all: until the context ends)."""
    limit = default if asked is None else asked
    if ceiling is not None:
        limit = ceiling if limit is None else min(limit, ceiling)
    return limit
