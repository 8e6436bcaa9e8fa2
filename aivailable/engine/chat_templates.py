"""Chat prompt formatting: the GGUF's own template, else the right one for the architecture.

llama-cpp-python silently falls back to a generic format when a GGUF has no template (the Gemma
test model has none); that yields a prompt the model was never trained on. We never do that: a
model with no template and no known architecture template serves completions only and chat
requests get a clear 400.
"""

from __future__ import annotations

from dataclasses import dataclass

from aivailable.errors import InvalidRequest

# Built-in templates, keyed by the `chat_format_hint` that engine.gguf_info derives from the
# architecture. Each mirrors the model family's published template.
BUILTIN_TEMPLATES: dict[str, tuple[str, list[str]]] = {
    # Google's Gemma template: no system role; a system/developer message is prefixed to the
    # first user turn (dropping it, as llama-cpp-python's "gemma" format does, loses instructions).
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] in ['system', 'developer'] %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
        "<start_of_turn>{{ role }}\n{{ (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
        ["<end_of_turn>"],
    ),
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_end|>"],
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ["<|eot_id|>"],
    ),
    "llama-2": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
        "{% elif message['role'] == 'system' %}<<SYS>>\n{{ message['content'] | trim }}\n<</SYS>>\n\n"
        "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}",
        [],
    ),
    "mistral-instruct": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] in ['user', 'system'] %}[INST] {{ message['content'] | trim }} [/INST]"
        "{% else %}{{ message['content'] | trim }}{{ eos_token }}{% endif %}{% endfor %}",
        [],
    ),
    "phi-3": (
        "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        ["<|end|>"],
    ),
}


@dataclass(frozen=True)
class ChatTemplate:
    """A resolved template: its source ("gguf" or "builtin:<name>"), Jinja text and extra stop strings."""

    source: str
    template: str
    stops: tuple[str, ...]


def resolve_template(gguf_template: str | None, hint: str | None) -> ChatTemplate | None:
    """The GGUF's own template wins; else the built-in for the architecture hint; else None."""
    if gguf_template:
        return ChatTemplate("gguf", gguf_template, ())
    if hint and hint in BUILTIN_TEMPLATES:
        text, stops = BUILTIN_TEMPLATES[hint]
        return ChatTemplate(f"builtin:{hint}", text, tuple(stops))
    return None


def render(template: ChatTemplate, messages: list[dict], *, bos: str, eos: str,
           tools: list[dict] | None = None) -> str:
    """Render `messages` ([{role, content, ...}]) into a prompt ending with the assistant turn opener.
    `tools` (OpenAI tool objects) are passed to templates that render them."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    msgs = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    formatter = Jinja2ChatFormatter(template.template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
    try:
        return formatter(messages=msgs, tools=tools or None).prompt
    except Exception as exc:  # the template's own raise_exception() (e.g. roles must alternate)
        raise InvalidRequest(f"The model's chat template rejected the messages: {exc}", param="messages") from exc
