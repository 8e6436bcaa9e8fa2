"""Node configuration: TOML file < AIVAILABLE_* environment < command-line flags.

Every key is optional; unknown keys and bad values raise ConfigError naming the key (CLI exit 2).
"""

from __future__ import annotations

import contextvars
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from aivailable.engine.spec import SamplingDefaults
from aivailable.errors import ConfigError
from aivailable.keepalive import FOREVER, parse_duration
from aivailable.names import MODEL_NAME_RULE, is_model_name
from aivailable.paths import default_state_dir

DEFAULT_PORT = 8000
DEFAULT_STATE_DIR = "~/.local/state/aivailable"
DEFAULT_MAX_TOKENS = 512
"""Node-wide default of generated tokens when a request sets no max_tokens (README, "Token budget")."""
KvCacheSetting = Literal["f16", "q8_0", "q4_0", "auto"]
"""engine.kvcache.SETTINGS: the KV cache types a model may ask for."""
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HF_RE = re.compile(r"^hf://[A-Za-z0-9][\w.-]*/[\w.-]+/.+\.gguf$")


class Affinity(BaseModel):
    """Where a model's replicas may go: node ids, vendors, GPU names (empty = anywhere)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    nodes: tuple[str, ...] = ()
    vendors: tuple[str, ...] = ()
    gpu_names: tuple[str, ...] = ()


class ModelConfig(BaseModel):
    """One catalog entry (TOML `[[models]]` or `--model NAME=PATH[:CTX]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    path: str | None = None
    """The GGUF file on this node. Other nodes fetch it from here (or any holder) when placed there."""
    source: str | None = None
    """`hf://OWNER/REPO/FILE.gguf`: downloaded from Hugging Face by the node that defines it, at startup."""
    sha256: str | None = None
    """The file's sha256 (lowercase hex). Alone, it names a file some peer holds; with `path` it is checked."""
    ctx: int = Field(default=4096, ge=64, le=1 << 20)
    parallel: int = Field(default=1, ge=1, le=64)
    embedding: bool = False
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    pinned: bool = False
    affinity: Affinity = Affinity()
    chat_format: str | None = None
    max_queue: int = Field(default=16, ge=0, le=10_000)
    max_tokens_default: int | None = Field(default=None, ge=1)
    """Tokens generated for a request that sets no max_tokens (None: the node's `max_tokens_default`)."""
    max_tokens_ceiling: int | None = Field(default=None, ge=1)
    """Most tokens one request may generate; a larger max_tokens is clamped (None: the slot's context)."""
    sampling: SamplingDefaults | None = None
    """Sampling for requests that leave a parameter unset, e.g. a model card's recommended settings."""
    mmproj: str | None = None
    """The model's multimodal projector GGUF on this node (llama.cpp's `--mmproj`): with it the model
    accepts image content parts. Other nodes fetch it with the model file."""
    mmproj_sha256: str | None = None
    """The projector file's sha256 (lowercase hex): names a file some peer holds, or checks `mmproj`."""
    mmproj_source: str | None = None
    """`hf://OWNER/REPO/FILE.gguf`: the projector, downloaded at startup like `source`."""
    keep_alive: float | None = None
    """Seconds the model stays loaded after its last request ("5m", "1h", 300; -1 = forever, 0 = unload after
    each use); None: the node's `keep_alive` (aivailable/keepalive.py)."""

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)
    kv_cache_type: KvCacheSetting | None = None
    """How K and V are stored (engine/kvcache.py): f16, q8_0 (about half the KV memory), q4_0 (about a
    quarter), or auto (placement picks per replica: f16 where it fits, quantized to fit more). None: the
    node's `kv_cache_type`."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not is_model_name(v):
            raise ValueError(f"model name {v[:140]!r} is not allowed: use {MODEL_NAME_RULE}")
        return v

    @field_validator("sha256", "mmproj_sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256_RE.match(v.lower()):
            raise ValueError("must be 64 hexadecimal characters (a sha256)")
        return v.lower() if v else v

    @field_validator("source", "mmproj_source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None and not _HF_RE.match(v):
            raise ValueError("must be hf://OWNER/REPO/FILE.gguf")
        return v

    @model_validator(mode="after")
    def _replicas(self):
        if self.path is None and self.source is None and self.sha256 is None:
            raise ValueError(f"model {self.name!r} needs a path, a source (hf://...) or a sha256")
        if self.embedding and (self.mmproj or self.mmproj_sha256 or self.mmproj_source):
            raise ValueError(f"model {self.name!r}: an embedding model cannot have a multimodal projector (mmproj)")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if (self.max_tokens_default is not None and self.max_tokens_ceiling is not None
                and self.max_tokens_default > self.max_tokens_ceiling):
            raise ValueError(f"max_tokens_default ({self.max_tokens_default}) exceeds max_tokens_ceiling "
                             f"({self.max_tokens_ceiling})")
        return self

    @classmethod
    def from_flag(cls, spec: str) -> ModelConfig:
        """Parse `NAME=PATH[:CTX]` (the `--model` flag)."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ConfigError(f"--model {spec!r}: expected NAME=PATH[:CTX]", param="--model")
        path, ctx = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and tail.isdigit():
            path, ctx = head, int(tail)
        try:
            return cls(name=name, path=path, **({"ctx": ctx} if ctx else {}))
        except ValidationError as exc:
            raise ConfigError(f"--model {spec!r}: {_describe(exc, '')}", param="--model") from None


_toml_node: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("toml_node", default=None)


class _TomlNode(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_node.get() or {})


def _split_list(v: Any) -> Any:
    if isinstance(v, str):
        v = v.strip()
        if v.startswith("["):
            import json

            return json.loads(v)
        return [x.strip() for x in v.split(",") if x.strip()]
    return v


CsvList = Annotated[list[str], NoDecode]


class NodeConfig(BaseSettings):
    """The `[node]` table; each key also reads `AIVAILABLE_<KEY>` (lists comma-separated) and a flag."""

    model_config = SettingsConfigDict(env_prefix="AIVAILABLE_", extra="forbid", frozen=True,
                                      use_attribute_docstrings=True)

    host: str = "0.0.0.0"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    state_dir: str = Field(default_factory=default_state_dir)
    """Node state (id, election vote, secret, cache): $XDG_STATE_HOME/aivailable, else DEFAULT_STATE_DIR."""
    join: CsvList = []
    mdns: bool = True
    simulate_gpus: CsvList = []
    demo: bool = False
    cluster_secret: str | None = None
    """The cluster's shared secret (peers must have the same one); default: STATE_DIR/cluster_secret."""
    cluster_secret_file: str | None = None
    """A file holding the cluster secret (mode 0600), instead of STATE_DIR/cluster_secret."""
    insecure_cluster: bool = False
    """Plain HTTP between nodes on the API port, for debugging only. Default: TLS with mutual authentication
    on the cluster port (API port + 1), certificates derived from the cluster secret. Every node of a
    cluster must use the same choice."""
    tls: Literal["off", "auto"] = "off"
    """HTTPS for clients on the API port. "auto": this node issues itself a certificate from the cluster CA
    (`aivailable ca` prints the CA for clients to trust) naming its addresses, host name, localhost and
    tls_names, renewed at each start (STATE_DIR/tls/api.pem). "off": plain HTTP, unless tls_cert is set."""
    tls_cert: str | None = None
    """A PEM certificate (chain) for HTTPS on the API port, from the lab's own CA or a public one; with tls_key."""
    tls_key: str | None = None
    """The unencrypted PEM private key of tls_cert."""
    tls_names: CsvList = []
    """More host names or addresses the tls = "auto" certificate names (a DNS alias of the node, say)."""
    tls_redirect_port: int | None = Field(default=None, ge=1, le=65535)
    """A plain-HTTP port whose every request is answered with a 308 redirect to the same path over HTTPS on
    the API port (for browsers typing the status page's address). Needs HTTPS; never the cluster port."""
    api_keys: CsvList = []
    rate_limit_rpm: int = Field(default=0, ge=0)
    """Requests per minute each API key may send to this node (token bucket; 0 = unlimited)."""
    rate_limit_burst: int = Field(default=0, ge=0)
    """Requests a key may send at once after being idle (0 = a minute's worth, i.e. the key's rpm)."""
    api_key_rpm: dict[str, Annotated[int, Field(ge=0)]] = {}
    """Per-key overrides of rate_limit_rpm (TOML table `[node.api_key_rpm]`, key = the API key)."""
    protect_status: bool = False
    """The status page, /api/cluster, /api/history and /metrics need a key too (a viewer, user, config or admin
    key: `Authorization: Bearer`); /health stays open. Viewer keys (`aivailable keys add --viewer`) only read."""
    node_id: str | None = None
    advertise_host: str | None = None
    """The address peers and clients should use for this node (default: this machine's primary address)."""
    max_body_bytes: int = Field(default=20 << 20, ge=1024)
    """Largest request body (a data-URL image is 4/3 of its bytes: 20 MiB holds a 10 MiB image and text)."""
    allow_image_urls: bool = False
    """Fetch http(s) image URLs of chat requests (the entry node fetches, then forwards the bytes). Off: only
    data: URLs, so an anonymous client cannot make the node fetch arbitrary addresses."""
    max_image_bytes: int = Field(default=10 << 20, ge=1024)
    """Largest image (decoded bytes) a request may carry or the node may fetch; larger is a 400."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """A request body must arrive whole within this many seconds, else 408 (a stalled client frees its slot)."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A new connection must deliver its first request's headers whole within this many seconds, else it is
    closed (silent or trickling clients cannot hold sockets)."""
    keepalive_timeout_s: float = Field(default=30.0, gt=0)
    """An idle keep-alive connection (between requests) is closed after this many seconds."""
    max_connections_per_client: int = Field(default=256, ge=1)
    """Most TCP connections one client address may hold open to this node; more are closed at once. Peers
    forward over pooled connections (at most ~100 per peer), so keep this above that."""
    cors_origins: CsvList = []
    """Web origins (`https://app.example:8443`, or `*` for any) whose pages may call the API from a browser
    (CORS). Empty: preflights are refused and cross-origin POSTs get 403."""
    allowed_hosts: CsvList = []
    """Host names clients may address this node by (DNS-rebinding defence); empty = any. IP addresses and
    the node's advertised host are always accepted."""
    log_level: str = "INFO"
    models_dir: str | None = None
    """Where model files live: `*.gguf` dropped here are offered to the cluster; files fetched from peers
    or Hugging Face go to its `fetched/` folder. Default: STATE_DIR/models."""
    disk_budget_mib: int = Field(default=0, ge=0)
    """Most MiB the `fetched/` folder may hold (0 = no limit): least recently used files no worker uses and
    no pinned model needs are removed to make room. Files you put in models_dir yourself are never removed."""
    bandwidth_mib_s: float = Field(default=0.0, ge=0.0)
    """Limit of this node's incoming model-file transfers in MiB/s (0 = no limit)."""
    chunk_mib: float = Field(default=8.0, ge=0.0625, le=256.0)
    """Size of one transfer chunk (each verified by its own sha256) in MiB."""
    max_tokens_default: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    """Tokens generated for a request that sets no max_tokens, for models whose definition sets none
    (always also bounded by the slot's context: ctx / parallel minus the prompt)."""
    routing: Literal["prefix", "p2c"] = "prefix"
    """How an entry node picks among a model's replicas: "prefix" keeps each conversation on the replica that
    caches its prompt (the same choice on every node, within a load bound; api/affinity.py), "p2c" is the
    power of two choices on load alone."""
    autonomous_grace_s: float = Field(default=10.0, ge=0)
    """With no coordinator for this long (a minority after losing most nodes), a node loads models that clients
    ask it for and no reachable node serves onto its own free VRAM (aivailable/autonomy.py); 0 = never."""
    load_wait_s: float = Field(default=120.0, ge=0)
    """How long a request for a model that is loading (or being re-placed, or loading on demand) waits at
    its entry node for a ready replica before it gets 503 + Retry-After (0 = answer 503 at once)."""
    keep_alive: float = FOREVER
    """Default keep-alive of models that set none: seconds a model stays loaded after its last request ("5m",
    "1h", 300; -1 = forever, 0 = unload after each use). Every node of a cluster should use the same."""
    kv_cache_type: KvCacheSetting = "f16"
    """KV cache type of this node's models that set none (see ModelConfig.kv_cache_type)."""
    profile: Literal["lan", "local"] = "lan"
    """Gossip/election timings: "lan" for machines on a network, "local" for nodes on one host (tests)."""
    history_interval_s: float = Field(default=10.0, gt=0, le=600)
    """Seconds between points of the in-memory last hour (GET /api/history, the status page's charts)."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text (with date and time) or one JSON object per line (ts, level, logger, msg, extras)."""
    join_token: str | None = None
    """A join token (`aivailable token` on a cluster's node prints it): the cluster's address(es) and
    secret in one string; sets join and the cluster secret."""

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: Any) -> Any:
        return parse_duration(v)

    @field_validator("join", "simulate_gpus", "api_keys", "cors_origins", "allowed_hosts", "tls_names",
                     mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("join")
    @classmethod
    def _hostports(cls, v: list[str]) -> list[str]:
        for item in v:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not HOST:PORT")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for item in v:
            if item != "*" and not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+/?$", item):
                raise ValueError(f"{item!r} is not an origin (scheme://host[:port], or *)")
        return v

    @model_validator(mode="after")
    def _rpm_keys(self):
        for i, key in enumerate(self.api_key_rpm, 1):
            if key not in self.api_keys:  # never echo the key itself: name it by position
                raise ValueError(f"api_key_rpm entry #{i} is for a key that is not in api_keys (keys are not shown)")
        return self

    @model_validator(mode="after")
    def _tls(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            have, lack = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            raise ValueError(f"{have} is set without {lack}: HTTPS needs both the certificate and its key")
        if self.tls == "auto" and self.tls_cert is not None:
            raise ValueError('tls = "auto" issues its own certificate: set tls_cert + tls_key or tls = "auto", '
                             "not both")
        if self.tls_names and self.tls != "auto":
            raise ValueError('tls_names are names for the tls = "auto" certificate; set tls = "auto" too')
        if self.https and self.insecure_cluster:
            raise ValueError("tls (HTTPS for clients) needs TLS between nodes: with insecure_cluster peers send "
                             "plain HTTP to the API port")
        redirect = self.tls_redirect_port
        if redirect is not None and not self.https:
            raise ValueError('tls_redirect_port redirects to HTTPS: set tls = "auto" or tls_cert + tls_key')
        if redirect is not None and self.port and redirect in (self.port, self.port + 1):
            raise ValueError(f"tls_redirect_port {redirect} is the API port or the cluster port (API port + 1); "
                             "pick another port")
        return self

    @property
    def https(self) -> bool:
        """The client API serves HTTPS (tls = "auto", or tls_cert + tls_key)."""
        return self.tls == "auto" or self.tls_cert is not None

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return v.upper()

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _TomlNode(settings_cls))

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir).expanduser() if self.models_dir else self.state_path / "models"


def token_budget(entry: Mapping[str, Any], node_default: int) -> tuple[int, int | None]:
    """(default, ceiling) of generated tokens for catalog model `entry` on a node whose default is
    `node_default`: the model's own default, else the node's, never above the model's ceiling."""
    ceiling = entry.get("max_tokens_ceiling")
    default = int(entry.get("max_tokens_default") or node_default)
    if ceiling is not None:
        ceiling = int(ceiling)
        default = min(default, ceiling)
    return default, ceiling


class Settings(BaseModel):
    """Everything a node runs with."""

    model_config = ConfigDict(frozen=True)
    node: NodeConfig
    models: tuple[ModelConfig, ...] = ()


def _describe(exc: ValidationError, prefix: str) -> str:
    err = exc.errors(include_url=False)[0]
    loc = prefix
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}"


def load_settings(config_file: str | None, flags: dict[str, Any], flag_models: list[str]) -> Settings:
    """Merge the TOML file, the environment and the flags (flags win); ConfigError names the bad key."""
    data: dict[str, Any] = {}
    if config_file:
        path = Path(config_file).expanduser()
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config {config_file}: no such file", param="--config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config {config_file}: not valid TOML: {exc}", param="--config") from None
    unknown = set(data) - {"node", "models"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown top-level key (expected [node] and [[models]])",
                          param=sorted(unknown)[0])
    node_table = data.get("node", {})
    if not isinstance(node_table, dict):
        raise ConfigError("node: must be a table", param="node")
    token = _toml_node.set(node_table)
    try:
        node = NodeConfig(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "node"), param="node") from None
    finally:
        _toml_node.reset(token)
    models: list[ModelConfig] = []
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list):
        raise ConfigError("models: must be an array of tables ([[models]])", param="models")
    for i, m in enumerate(raw_models):
        try:
            models.append(ModelConfig.model_validate(m))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, f"models[{i}]"), param=f"models[{i}]") from None
    models.extend(ModelConfig.from_flag(s) for s in flag_models)
    if node.kv_cache_type != "f16":  # the node default applies to its own models (gossiped with them)
        models = [m if m.kv_cache_type else m.model_copy(update={"kv_cache_type": node.kv_cache_type})
                  for m in models]
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"models: {dupes[0]!r} is defined twice", param="models")
    return Settings(node=node, models=tuple(models))
