"""Command line: `aivailable up | doctor | status | place` (see CONTRACTS.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request

from aivailable import __version__
from aivailable.admin_cli import add_parsers as add_admin_parsers
from aivailable.errors import ConfigError, NodeError

EXIT_USAGE = 2


EXAMPLES = """\
examples:
  aivailable up --demo                          try it: a simulated GPU and two small models
  aivailable up --model qwen=~/models/qwen2.5-7b-q4_k_m.gguf:8192
  aivailable up --join-token aiv1:...           add this machine to a cluster (`aivailable token` there)
  aivailable status --watch                     the cluster, redrawn every 2 s
  aivailable doctor                             which GPUs and llama.cpp backend this machine has
  aivailable ca > ca.pem                        the CA that clients of `up --tls auto` nodes trust
  source <(aivailable completion bash)          tab completion (also zsh, fish)
"""
UP_EXAMPLES = """\
examples:
  aivailable up --demo
  aivailable up --model NAME=PATH.gguf[:CTX] --simulate-gpu lab:8192
  aivailable up --config ~/.config/aivailable/config.toml
  aivailable up --join-token aiv1:...           join the cluster that printed this token
  aivailable up --log-format json               one JSON object per log line
  aivailable up --tls auto                      HTTPS for clients (`aivailable ca` prints the CA to trust)

Each flag also reads AIVAILABLE_<NAME> from the environment and [node] <name> from the config file
(default $XDG_CONFIG_HOME/aivailable/config.toml where it exists); flags win.
"""


def _parser() -> argparse.ArgumentParser:
    from aivailable.paths import default_state_dir

    p = argparse.ArgumentParser(prog="aivailable", description="Highly available LLM serving on mixed, old GPUs.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"aivailable {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run a node (OpenAI API + status page on one port)", epilog=UP_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--config", metavar="FILE",
                    help="TOML config file (default $XDG_CONFIG_HOME/aivailable/config.toml, if it exists)")
    up.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    up.add_argument("--port", type=int, help="port to listen on (default 8000)")
    up.add_argument("--state-dir", dest="state_dir", metavar="DIR",
                    help=f"node state (default {default_state_dir()}: $XDG_STATE_HOME/aivailable, else "
                         "~/.local/state/aivailable)")
    up.add_argument("--model", action="append", default=[], metavar="NAME=PATH[:CTX]", help="serve a GGUF model")
    up.add_argument("--simulate-gpu", dest="simulate_gpus", action="append", metavar="NAME:VRAM_MIB",
                    help="declare a simulated GPU (runs on the CPU; for development and tests)")
    up.add_argument("--demo", action="store_true", default=None,
                    help="a simulated GPU and two small models from PyPI: SmolLM2 135M Instruct (chat) "
                         "and Gemma 3 270M (base)")
    up.add_argument("--join", action="append", metavar="HOST:PORT", help="seed peer(s) to join")
    up.add_argument("--no-mdns", dest="mdns", action="store_false", default=None, help="disable mDNS discovery")
    up.add_argument("--cluster-secret", dest="cluster_secret", metavar="S")
    up.add_argument("--cluster-secret-file", dest="cluster_secret_file", metavar="F")
    up.add_argument("--api-key", dest="api_keys", action="append", metavar="K", help="require this client API key")
    up.add_argument("--rate-limit-rpm", dest="rate_limit_rpm", type=int, metavar="N",
                    help="requests per minute per API key (default 0: unlimited)")
    up.add_argument("--max-tokens-default", dest="max_tokens_default", type=int, metavar="N",
                    help="tokens generated when a request sets no max_tokens (default 512; per model: "
                         "max_tokens_default)")
    up.add_argument("--load-wait-s", dest="load_wait_s", type=float, metavar="S",
                    help="how long a request waits for a loading model before 503 (default 120; 0 = at once)")
    up.add_argument("--keep-alive", dest="keep_alive", metavar="DURATION",
                    help="default time a model stays loaded after its last request, e.g. 5m, 1h, 300 "
                         "(default -1: forever; 0: unload after each use; per model: keep_alive)")
    up.add_argument("--kv-cache-type", dest="kv_cache_type", choices=("f16", "q8_0", "q4_0", "auto"),
                    help="KV cache type of models that set none (default f16; auto: placement picks per replica)")
    up.add_argument("--node-id", dest="node_id", help="node id (default: persisted in the state directory)")
    up.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")
    up.add_argument("--models-dir", dest="models_dir", metavar="DIR",
                    help="model files: *.gguf here are offered to the cluster (default STATE_DIR/models)")
    up.add_argument("--disk-budget-mib", dest="disk_budget_mib", type=int, metavar="MIB",
                    help="most MiB of files fetched from peers/Hugging Face to keep (default 0: no limit)")
    up.add_argument("--bandwidth-mib-s", dest="bandwidth_mib_s", type=float, metavar="MIB_S",
                    help="limit of incoming model-file transfers (default 0: no limit)")
    up.add_argument("--chunk-mib", dest="chunk_mib", type=float, metavar="MIB",
                    help="transfer chunk size, each chunk sha256-verified (default 8)")
    up.add_argument("--join-token", dest="join_token", metavar="TOKEN",
                    help="join the cluster whose node printed TOKEN (`aivailable token`): its address(es) and secret")
    up.add_argument("--log-format", dest="log_format", choices=("text", "json"),
                    help="log lines as text with date and time (default) or one JSON object per line")
    up.add_argument("--allow-image-urls", dest="allow_image_urls", action="store_true", default=None,
                    help="fetch http(s) image URLs in chat requests (default: only data: URLs)")
    up.add_argument("--max-image-bytes", dest="max_image_bytes", type=int, metavar="BYTES",
                    help="largest image a request may carry (default 10 MiB)")
    up.add_argument("--tls", choices=("off", "auto"))  # help: NodeConfig's docstrings (cli_flags)
    up.add_argument("--tls-cert", dest="tls_cert", metavar="FILE")
    up.add_argument("--tls-key", dest="tls_key", metavar="FILE")
    up.add_argument("--tls-name", dest="tls_names", action="append", metavar="NAME")
    up.add_argument("--tls-redirect-port", dest="tls_redirect_port", type=int, metavar="PORT")

    doc = sub.add_parser("doctor", help="which GPUs exist, which llama.cpp backend is built in, what is usable")
    doc.add_argument("--simulate-gpu", dest="simulate_gpus", action="append", default=[], metavar="NAME:VRAM_MIB")
    doc.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="the cluster as a node sees it")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="a node's address (default %(default)s)")
    st.add_argument("--json", action="store_true")
    st.add_argument("--api-key", dest="api_key", metavar="KEY", default=os.environ.get("AIVAILABLE_API_KEY"),
                    help="a key for a node with protect_status (viewer, user or admin key; default "
                         "$AIVAILABLE_API_KEY)")
    st.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                    help="redraw every SECONDS (default 2) until Ctrl-C")

    tk = sub.add_parser("token", help="print the join command for this node's cluster (address(es) + secret)")
    tk.add_argument("--url", default="http://127.0.0.1:8000",
                    help="a running node of the cluster, asked for its address and peers (default %(default)s)")
    tk.add_argument("--address", action="append", metavar="HOST:PORT",
                    help="put this address in the token instead of asking --url (repeatable)")
    tk.add_argument("--state-dir", dest="state_dir", metavar="DIR",
                    help=f"the node's state directory, which holds the secret (default {default_state_dir()})")
    tk.add_argument("--cluster-secret-file", dest="cluster_secret_file", metavar="FILE",
                    help="read the secret from this file instead")
    tk.add_argument("--token-only", action="store_true", help="print only the token, not the command")

    ca = sub.add_parser("ca", help="print the cluster CA certificate (PEM) for HTTPS clients of --tls auto nodes",
                        description="The CA is derived from the cluster secret: the same on every node. Its "
                                    "sha256 fingerprint goes to stderr.")
    ca.add_argument("--state-dir", dest="state_dir", metavar="DIR",
                    help=f"the node's state directory, which holds the secret (default {default_state_dir()})")
    ca.add_argument("--cluster-secret-file", dest="cluster_secret_file", metavar="FILE",
                    help="read the secret from this file instead")
    ca.add_argument("--out", metavar="FILE", help="write the PEM to FILE instead of stdout")

    add_admin_parsers(sub)  # drain, undrain, admin-key
    from aivailable.keys_cli import add_parsers as add_keys_parsers

    add_keys_parsers(sub)
    cp = sub.add_parser("completion", help="print a shell completion script")
    cp.add_argument("shell", choices=("bash", "zsh", "fish"))

    svc = sub.add_parser("service", help="run the node as a systemd service")
    svc_sub = svc.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    si = svc_sub.add_parser("install", help="write a systemd unit running `aivailable up` with the flags that follow",
                            description="Any further flags are `aivailable up` flags for the unit's ExecStart.")
    si.add_argument("--user", action="store_true", help="a user unit (systemctl --user) instead of a system one")
    si.add_argument("--print", dest="print_only", action="store_true", help="print the unit instead of writing it")

    pl = sub.add_parser("place", help="run the placement solver on a scenario file and print placement JSON")
    pl.add_argument("--scenario", required=True, metavar="FILE.json")
    from aivailable.cli_flags import add_generated_flags
    from aivailable.config import NodeConfig

    add_generated_flags(up, NodeConfig)  # last: only for settings that no hand-written flag covers
    return p


def _setup_logging(level: str, fmt: str = "text") -> None:
    from aivailable.logfmt import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_client_garbage_in_one_line)


def _client_garbage_in_one_line(record: logging.LogRecord) -> bool:
    """aiohttp logs a request it cannot even parse (bad chunking, unknown Content-Encoding) with a
    traceback, though the client is at fault and got a 400: keep one warning line naming the client."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
        record.msg, record.args = "%s (answered %d): %s", (record.getMessage(), exc.code, " ".join(exc.message.split()))
        record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.WARNING, "WARNING"
    return True


def _cmd_up(args: argparse.Namespace) -> int:
    from aivailable.config import load_settings
    from aivailable.node import run_node

    flags = {k: getattr(args, k) for k in ("host", "port", "state_dir", "simulate_gpus", "demo", "join", "mdns",
                                            "cluster_secret", "cluster_secret_file", "api_keys", "rate_limit_rpm",
                                            "node_id", "log_level", "models_dir", "disk_budget_mib",
                                            "bandwidth_mib_s", "chunk_mib", "max_tokens_default",
                                            "allow_image_urls", "max_image_bytes", "load_wait_s", "keep_alive",
                                            "kv_cache_type", "tls", "tls_cert", "tls_key", "tls_names",
                                            "tls_redirect_port")}
    flags.update(join_token=args.join_token, log_format=args.log_format)
    from aivailable import jointoken
    from aivailable.cli_flags import generated_values
    from aivailable.paths import config_file

    flags.update({k: v for k, v in generated_values(args).items() if k not in flags})
    settings = load_settings(config_file(args.config), flags, args.model)
    _setup_logging(settings.node.log_level, settings.node.log_format)
    from aivailable.statedir import check_writable

    check_writable(settings.node.state_path)  # before --demo assembles its model there
    settings = jointoken.apply(settings)
    if settings.node.demo:
        from aivailable.demo import with_demo

        settings = with_demo(settings)
    _check_models(settings)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_node(settings))


def _loop_factory():
    """uvloop's event loop where installed (it halves the event loop's share of proxying a request); the
    standard one with AIVAILABLE_EVENT_LOOP=asyncio."""
    import os

    if os.environ.get("AIVAILABLE_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None


def _check_models(settings) -> None:
    from pathlib import Path

    for i, m in enumerate(settings.models):
        if m.path is None:
            continue  # fetched from a peer or Hugging Face
        p = Path(m.path).expanduser()
        if not p.is_file():
            raise ConfigError(f"models[{i}].path ({m.name}): no such file: {m.path}", param=f"models[{i}].path")


def _cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None:
        from aivailable.status_watch import watch

        return watch(args.url, args.watch, as_json=args.json, api_key=args.api_key)
    url = args.url.rstrip("/") + "/api/cluster"
    try:
        with urllib.request.urlopen(authorized(url, args.api_key), timeout=10) as r:
            view = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        from aivailable.ca_command import untrusted_hint

        print(f"aivailable status: cannot read {url}: {exc}{untrusted_hint(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    from aivailable.status_table import render_status

    render_status(view)
    return 0


def authorized(url: str, api_key: str | None) -> urllib.request.Request:
    """A GET of `url`, with `Authorization: Bearer` when a key is given (nodes with protect_status)."""
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    return req


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aivailable` console script."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "service":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "up":
            return _cmd_up(args)
        if args.command == "doctor":
            from aivailable.engine.doctor import doctor_command

            return doctor_command(args.simulate_gpus, args.json)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "token":
            from aivailable.token_command import token_command

            return token_command(args)
        if args.command == "ca":
            from aivailable.ca_command import ca_command

            return ca_command(args)
        if args.command in ("drain", "undrain", "admin-key"):
            from aivailable.admin_cli import drain_command

            return drain_command(args)
        if args.command == "keys":
            from aivailable.keys_cli import keys_command

            return keys_command(args)
        if args.command == "completion":
            from aivailable.completion import script

            sys.stdout.write(script(args.shell, _parser()))
            return 0
        if args.command == "service":
            parser.parse_args(["up", *extra])  # the unit's `up` flags: argparse names a bad one (exit 2)
            from aivailable.service import install_command

            return install_command(extra, user_unit=args.user, print_only=args.print_only)
        if args.command == "place":
            from aivailable.placement.command import place_command

            return place_command(args.scenario)
    except ConfigError as exc:
        print(f"aivailable {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except NodeError as exc:  # e.g. an unusable state directory: the message says what to do
        print(f"aivailable {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
