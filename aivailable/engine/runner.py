"""llama.cpp execution for one model: load (verifying GPU offload), generate, embed.

Runs inside a worker process. Loading and embeddings are blocking calls the worker makes on one
dedicated thread. Generation goes through an engine.batch.BatchEngine, which owns the model's only
generation context and runs up to `parallel` requests at once on its own thread; the worker's event
loop talks to it through `emit` callbacks and a Future per request. Usage is exact in streams, stop
sequences never leak, and a cancelled request stops at the next step.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from aivailable.engine import prompt as safe_prompt
from aivailable.engine.chat_templates import ChatTemplate, render, resolve_template
from aivailable.engine.chatplan import ChatPlan
from aivailable.engine.kvcache import (
    attention_left_device,
    ggml_id,
    graph_splits,
    kv_refusal,
    needs_flash_attn,
)
from aivailable.engine.spec import WorkerSpec
from aivailable.engine.tools import ToolFormat, detect_format
from aivailable.errors import InvalidRequest, NodeError

# llama.cpp's own server defaults, used where a request leaves a sampling parameter unset.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05



class LoadError(NodeError):
    """The model cannot run as asked (file, memory, or not fully offloaded); `message` says why."""

    http_status = 503


@dataclass
class GenParams:
    """Sampling and stopping for one request (already validated by wire.schemas)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    grammar: str | None = None
    """GBNF (start rule `root`) the answer must match: JSON mode, a JSON Schema, tool calls."""
    grammar_prefix: str = ""
    """Text already generated under `grammar` (a resumed stream): the grammar starts after it."""
    logprobs: int | None = None
    """Log-probabilities of each generated token and of this many alternatives; None = off."""
    prompt_logprobs: bool = False
    """Also score the prompt's tokens (completions `echo` with `logprobs`)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    prompt_param: str = "messages"
    """The request field a prompt error names ("prompt" for completions)."""


@dataclass
class GenResult:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop", "length" or "cancelled"."""
    ttft_s: float
    duration_s: float
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the slot's cache (not computed again)."""
    prompt_logprobs: list | None = None
    """With GenParams.prompt_logprobs: a TokenLogprob per prompt token (None for the first)."""
    first_token_s: float | None = None
    """Seconds from submit to the first sampled token (None: none was sampled, e.g. cancelled while queued)."""
    token_gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive output tokens (engine/latency.py: inter-token latency)."""


# A generation model's Llama object gets only this tiny context (closed right after loading): the
# BatchEngine creates the real one, with a slot per parallel request.
MAX_IMAGE_BYTES = 64 << 20
"""A worker's own bound on one image; the entry node enforces the node's (smaller) max_image_bytes first."""
PLACEHOLDER_CTX = 256
PLACEHOLDER_BATCH = 8


class Runner:
    """One loaded model. Not thread-safe: the worker calls it from a single thread."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.load_report = None
        self.template: ChatTemplate | None = None
        self.tool_format = ToolFormat.GENERIC
        self.specials = safe_prompt.Specials.of({})
        self.engine = None  # engine.batch.BatchEngine, for models that generate
        self.projector = None  # engine.media.Projector, for models with an mmproj
        self.projector_mib = 0.0
        """The projector's weights + one image's compute buffer (estimated: llama.cpp's load log omits them)."""
        self._llm = None
        self._lock = threading.Lock()

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model; on a real GPU refuse unless every layer is offloaded.

        An embedding model keeps the Llama object's own context. A generation model's Llama gets a
        placeholder context, closed at once; its BatchEngine then creates the one context that serves
        every slot, and the load report counts that context's KV cache and compute buffers.
        """
        import llama_cpp

        from aivailable.engine.gguf_info import chat_format_for
        from aivailable.engine.loadlog import capture_load_log

        spec = self.spec
        n_ctx, n_batch = ((spec.n_ctx, min(spec.n_batch, spec.n_ctx)) if spec.embedding
                          else (PLACEHOLDER_CTX, PLACEHOLDER_BATCH))
        kwargs: dict = dict(
            model_path=spec.path, n_ctx=n_ctx, n_batch=n_batch,
            n_threads=spec.n_threads, n_threads_batch=spec.n_threads,
            n_gpu_layers=0 if spec.simulated else -1, embedding=spec.embedding, verbose=False,
        )
        if spec.tensor_split and not spec.simulated:
            kwargs["tensor_split"] = list(spec.tensor_split)
        if spec.embedding and needs_flash_attn(spec.kv_cache_type):  # its own context is the one that serves
            kwargs.update(type_k=ggml_id(spec.kv_cache_type), type_v=ggml_id(spec.kv_cache_type), flash_attn=True)
        with capture_load_log(passthrough=False) as log:
            try:
                self._llm = llama_cpp.Llama(**kwargs)
                if spec.embedding and self._llm._ctx.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                    # The GGUF names no pooling (e.g. Gemma): one vector per token is not what
                    # /v1/embeddings means; reload with mean pooling.
                    self._llm.close()
                    self._llm = llama_cpp.Llama(**kwargs, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
            except Exception as exc:
                why = kv_refusal(spec.kv_cache_type, log.text) if spec.embedding else None
                raise LoadError(why or f"llama.cpp could not load {spec.path}: {exc}") from exc
        self.load_report = log.report()
        if not spec.embedding:
            self._start_engine(graph_splits(log.text))
        if spec.mmproj:
            self._load_projector()
        if not spec.simulated and not self.load_report.fully_offloaded:
            rep = self.load_report
            self.close()
            done = (f"only {rep.offloaded_layers}/{rep.total_layers} layers" if rep.offloaded_layers is not None
                    else "no layers (llama.cpp reported no GPU offload)")
            raise LoadError(
                f"{done} of {spec.model} were offloaded to the GPU(s) {','.join(spec.device_ids)}; refusing to run "
                "partly on the CPU (is llama-cpp-python built with the GPU backend? see `aivailable doctor`)")
        meta = self._llm.metadata
        arch = meta.get("general.architecture", "")
        special = [t for t in ("<|eot_id|>", "[INST]") if len(self._llm.tokenize(t.encode(), add_bos=False,
                                                                                   special=True)) == 1]
        hint = spec.chat_format or chat_format_for(arch, meta.get("general.name"), special)
        self.template = resolve_template(None if spec.chat_format else meta.get("tokenizer.chat_template"), hint)
        self._bos = self._piece(self._llm.token_bos())
        self._eos = self._piece(self._llm.token_eos())
        self.specials = safe_prompt.vocab_specials(llama_cpp, self._llm._model.vocab)
        if self.template is not None and self.template.source == "gguf":
            self.tool_format = detect_format(self.template.template)

    def _start_engine(self, base_splits: int | None = None) -> None:
        """Swap the placeholder context for the BatchEngine's; its buffers replace the placeholder's in the report.

        On a GPU, a quantized KV cache whose flash attention would run on the CPU is refused: its context
        splits the graph into many more parts than the placeholder context's (`base_splits`)."""
        from aivailable.engine.batch import BatchEngine
        from aivailable.engine.loadlog import capture_load_log

        spec = self.spec
        self._llm._ctx.close()  # the placeholder; nothing of the Llama object uses its context from now on
        with capture_load_log(passthrough=False) as log:
            try:
                self.engine = BatchEngine(self._llm._model, n_ctx=spec.n_ctx, parallel=spec.parallel,
                                          n_batch=spec.n_batch, n_threads=spec.n_threads,
                                          kv_cache_type=spec.kv_cache_type)
            except Exception as exc:
                self.close()
                why = kv_refusal(spec.kv_cache_type, log.text)
                if why:
                    raise LoadError(why) from exc
                raise LoadError(f"llama.cpp could not create a context of {spec.n_ctx} tokens for "
                                f"{spec.parallel} parallel sequences: {exc}") from exc
        ctx = log.report()
        off = None if spec.simulated else attention_left_device(spec.kv_cache_type, base_splits,
                                                                   graph_splits(log.text), self.load_report.total_layers or 0)
        if off:
            self.close()
            raise LoadError(off)
        self.load_report = dataclasses.replace(self.load_report, kv_mib=ctx.kv_mib, compute_mib=ctx.compute_mib,
                                               output_mib=ctx.output_mib, kv_cells=ctx.kv_cells)

    def _load_projector(self) -> None:
        from aivailable.engine.media import Projector, ProjectorError

        spec = self.spec
        try:
            self.projector = Projector(spec.mmproj, self._llm._model, use_gpu=not spec.simulated,
                                       n_threads=spec.n_threads)
        except ProjectorError as exc:
            self.close()
            raise LoadError(str(exc)) from exc
        self.engine.projector = self.projector
        from aivailable.engine.mmproj_info import read_projector_info

        self.projector_mib = read_projector_info(spec.mmproj).total_mib()

    def close(self) -> None:
        """Stop the engine and free the model (the worker calls it once, on the way out)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.projector is not None:
            self.projector.close()
            self.projector = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    @property
    def llm(self):
        if self._llm is None:
            raise LoadError("model is not loaded")
        return self._llm

    # -- prompts -------------------------------------------------------------------------------
    def chat_prompt(self, plan: ChatPlan, *, continue_final: bool = False,
                    cancelled=lambda: False) -> tuple[list[int], list[str], dict | None]:
        """Tokens of the rendered chat prompt, the template's stop strings and the images by start position
        (None without images; engine/media.py). Control tokens come only
        from the template (engine/prompt.py). With `continue_final`, the last (assistant) message is
        continued: the prompt is the conversation before it, the turn opener, then its text."""
        if self.template is None:
            raise InvalidRequest(
                f"model {self.spec.model!r} has no chat template and no known template for its architecture; "
                "use /v1/completions or set chat_format for it in the config", param="messages")
        sp = self.specials
        if plan.template_tools:
            safe_prompt.check_client_strings(sp, plan.template_tools, "tools")
        for i, m in enumerate(plan.messages):
            if m.get("tool_calls"):
                safe_prompt.check_client_strings(sp, m["tool_calls"], f"messages[{i}].tool_calls")
        messages, suffix = plan.messages, ""
        if continue_final:
            messages, suffix = messages[:-1], messages[-1]["content"]
        marked, texts = safe_prompt.placeholders(messages)
        rendered = render(self.template, marked, bos=self._bos, eos=self._eos, tools=plan.template_tools)
        parts = safe_prompt.pieces(rendered, texts, suffix)
        safe_prompt.check_size(parts, self.n_ctx_seq, "messages")
        if plan.images:
            prompt = self._media_prompt(plan, parts, cancelled)
            return prompt.tokens, list(self.template.stops), prompt.media
        tokens = safe_prompt.tokenize_pieces(parts, sp, self._plain_tokens, cancelled)
        return tokens, list(self.template.stops), None

    def _media_prompt(self, plan: ChatPlan, parts: list[tuple[str, bool]], cancelled):
        """The prompt of a chat with images: text as `chat_prompt` tokenizes it, each image's items where its
        mark was (engine/media.py)."""
        from aivailable.engine.media import MediaPrompt, ProjectorError, split_marks
        from aivailable.images import ImageError, decode_data_url

        if self.projector is None:
            raise InvalidRequest(f"model {self.spec.model!r} does not accept images (it has no multimodal projector)",
                                 param="messages")
        items: list = []
        run: list[tuple[str, bool]] = []

        def flush() -> None:
            if run:
                items.extend(safe_prompt.tokenize_pieces(run, self.specials, self._plain_tokens, cancelled))
                run.clear()

        for text, is_template in parts:
            for seg in ([text] if is_template else split_marks(text, plan.image_nonce)):
                if isinstance(seg, str):
                    run.append((seg, is_template))
                    continue
                flush()
                try:
                    image = decode_data_url(plan.images[seg], MAX_IMAGE_BYTES)
                    items.extend(self.projector.image_items(image.data))
                except (ImageError, ProjectorError) as exc:
                    raise InvalidRequest(f"image {seg} of the request cannot be used: {exc}", param="messages") from None
        flush()
        return MediaPrompt.of(items)

    def _plain_tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def text_prompt(self, prompt: str) -> list[int]:
        """Tokens of a completions prompt: BOS, then the text, never parsed for control tokens."""
        safe_prompt.check_size([(prompt, False)], self.n_ctx_seq, "prompt")
        return self.llm.tokenize(prompt.encode(), add_bos=True, special=False)

    # -- generation ----------------------------------------------------------------------------
    @property
    def n_ctx_seq(self) -> int:
        """Tokens one request may use (prompt + completion): the context split over the slots."""
        return self.engine.n_ctx_seq if self.engine is not None else self.llm.n_ctx()

    def submit(self, tokens: list[int], params: GenParams, cancel: threading.Event,
               emit: Callable[..., None], media: dict | None = None) -> Future:
        """Start generating from `tokens`; `emit(text_delta, logprobs)` is called from the engine's thread
        (`logprobs`: the entries of the tokens in that text, or None) and the
        Future gives the GenResult. Stops at EOG, a stop string, the limit or `cancel`. A prompt that
        cannot fit raises InvalidRequest here, before anything is sent."""
        if self.engine is None:
            raise InvalidRequest(f"model {self.spec.model!r} is an embedding model; it does not generate text",
                                 param="model")
        return self.engine.submit(tokens, params, cancel, emit, media)

    def generate(self, tokens: list[int], params: GenParams, cancel: threading.Event,
                 emit: Callable[..., None]) -> GenResult:
        """Blocking form of `submit`."""
        return self.submit(tokens, params, cancel, emit).result()

    # -- embeddings ----------------------------------------------------------------------------
    def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """One pooled, normalized vector per input, and the number of input tokens."""
        if not self.spec.embedding:
            raise InvalidRequest(f"model {self.spec.model!r} is not configured as an embedding model "
                                 "(set embedding = true for it)", param="model")
        llm = self.llm
        n_tokens = 0
        vectors: list[list[float]] = []
        for text in inputs:
            toks = llm.tokenize(text.encode(), add_bos=True, special=False)
            if len(toks) > llm.n_ctx():
                raise InvalidRequest(f"input of {len(toks)} tokens exceeds the context of {llm.n_ctx()}",
                                     param="input")
            n_tokens += len(toks)
            vectors.append(llm.embed(text, normalize=True))
        return vectors, n_tokens
