"""What the manager tells a worker process to run: one model on given GPU(s)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
    socket: str
