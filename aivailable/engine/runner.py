"""Blocking llama.cpp execution for one model: load (verifying GPU offload), generate, embed.

Runs inside a worker process, on one dedicated thread; the worker's event loop talks to it through
`emit` callbacks. Generation is our own token loop over `Llama.generate` so usage is exact in
streams, stop sequences never leak, and a cancelled request stops at the next token.
"""

from __future__ import annotations

import codecs
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aivailable.engine.chat_templates import ChatTemplate, render, resolve_template
from aivailable.engine.spec import WorkerSpec
from aivailable.errors import InvalidRequest, NodeError

# llama.cpp's own server defaults, used where a request leaves a sampling parameter unset.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05

JSON_GRAMMAR = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''


class LoadError(NodeError):
    """The model cannot run as asked (file, memory, or not fully offloaded); `message` says why."""

    http_status = 503


@dataclass
class GenParams:
    """Sampling and stopping for one request (already validated by api.schemas)."""

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
    json_mode: bool = False


@dataclass
class GenResult:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """"stop", "length" or "cancelled"."""
    ttft_s: float
    duration_s: float


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing chars of `text` could still be the start of a stop sequence."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class Runner:
    """One loaded model. Not thread-safe: the worker calls it from a single thread."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.load_report = None
        self.template: ChatTemplate | None = None
        self._llm = None
        self._lock = threading.Lock()

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model; on a real GPU refuse unless every layer is offloaded."""
        import llama_cpp

        from aivailable.engine.gguf_info import chat_format_for
        from aivailable.engine.loadlog import capture_load_log

        spec = self.spec
        kwargs: dict = dict(
            model_path=spec.path, n_ctx=spec.n_ctx, n_batch=min(spec.n_batch, spec.n_ctx),
            n_threads=spec.n_threads, n_threads_batch=spec.n_threads,
            n_gpu_layers=0 if spec.simulated else -1, embedding=spec.embedding, verbose=False,
        )
        if spec.tensor_split and not spec.simulated:
            kwargs["tensor_split"] = list(spec.tensor_split)
        with capture_load_log(passthrough=False) as log:
            try:
                self._llm = llama_cpp.Llama(**kwargs)
                if spec.embedding and self._llm._ctx.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                    # The GGUF names no pooling (e.g. Gemma): one vector per token is not what
                    # /v1/embeddings means; reload with mean pooling.
                    self._llm.close()
                    self._llm = llama_cpp.Llama(**kwargs, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
            except Exception as exc:
                raise LoadError(f"llama.cpp could not load {spec.path}: {exc}") from exc
        self.load_report = log.report()
        if not spec.simulated and not self.load_report.fully_offloaded:
            rep = self.load_report
            self._llm.close()
            self._llm = None
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
    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        """Tokens of the rendered chat prompt, and the template's stop strings."""
        if self.template is None:
            raise InvalidRequest(
                f"model {self.spec.model!r} has no chat template and no known template for its architecture; "
                "use /v1/completions or set chat_format for it in the config", param="messages")
        prompt = render(self.template, messages, bos=self._bos, eos=self._eos)
        return self.llm.tokenize(prompt.encode(), add_bos=False, special=True), list(self.template.stops)

    def text_prompt(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode(), add_bos=True, special=False)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, tokens: list[int], params: GenParams, cancel: threading.Event,
                 emit: Callable[[str], None]) -> GenResult:
        """Generate from `tokens`, calling `emit(text_delta)`; stops at EOG, a stop string, the limit or cancel."""
        import llama_cpp

        llm = self.llm
        n_ctx = llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise InvalidRequest(
                f"This model's maximum context length is {n_ctx} tokens, but the prompt is {len(tokens)} tokens.",
                param="messages")
        room = n_ctx - len(tokens)
        limit = min(params.max_tokens or room, room)
        grammar = None
        if params.json_mode:
            grammar = llama_cpp.LlamaGrammar.from_string(JSON_GRAMMAR, verbose=False)
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(31))
        temp = DEFAULT_TEMPERATURE if params.temperature is None else params.temperature
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = [s for s in params.stop if s]
        text, sent = "", 0
        n_out, finish, cut_by_stop = 0, "length", False
        t0 = time.perf_counter()
        ttft = 0.0
        gen = llm.generate(
            tokens, temp=temp,
            top_p=DEFAULT_TOP_P if params.top_p is None else params.top_p,
            top_k=DEFAULT_TOP_K if params.top_k is None else params.top_k,
            min_p=DEFAULT_MIN_P if params.min_p is None else params.min_p,
            repeat_penalty=1.0 if params.repeat_penalty is None else params.repeat_penalty,
            presence_penalty=params.presence_penalty or 0.0,
            frequency_penalty=params.frequency_penalty or 0.0,
            grammar=grammar,
        )
        try:
            for tok in gen:
                if n_out == 0:
                    ttft = time.perf_counter() - t0
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, tok):
                    finish = "stop"
                    break
                n_out += 1
                text += decoder.decode(llm.detokenize([tok], special=False))
                cut = min((i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0),
                          default=-1)
                if cut >= 0:
                    if cut > sent:
                        emit(text[sent:cut])
                    finish, cut_by_stop = "stop", True
                    break
                safe = len(text) - _held_back(text, stops)
                if safe > sent:
                    emit(text[sent:safe])
                    sent = safe
                if n_out >= limit:
                    break
            else:
                finish = "stop"
        finally:
            gen.close()
        if finish != "cancelled" and not cut_by_stop:  # text held back for a stop that never came
            rest = text + decoder.decode(b"", final=True)
            if len(rest) > sent:
                emit(rest[sent:])
        return GenResult(len(tokens), n_out, finish, ttft or (time.perf_counter() - t0),
                         time.perf_counter() - t0)

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
