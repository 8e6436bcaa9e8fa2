#!/usr/bin/env bash
# The package as a user installs it: build aivailable's sdist and wheel, install the wheel into a fresh
# venv (no source tree on the path: everything runs from a temporary folder), then `aivailable doctor`
# and `aivailable up --demo` until /health answers and a completion comes back, then stop it (SIGTERM).
# llama-cpp-python comes from $WHEELS (built once by .ci/run), so it is not compiled a second time.
#   usage: .ci/wheel_smoke.sh PYTHON WHEELS_DIR   (PYTHON: an interpreter with the `build` package)
set -euo pipefail
PY=$1
WHEELS=$(cd "$2" && pwd)
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
NODE_PID=
cleanup() {
  if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then kill -KILL "$NODE_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== wheel smoke: building aivailable's sdist and wheel"
"$PY" -m build -q --sdist --wheel --outdir "$WORK/dist" "$SRC" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/aivailable-*.whl)
test -f "$(ls "$WORK"/dist/aivailable-*.tar.gz)"

echo "== wheel smoke: installing the wheel into a fresh venv (llama-cpp-python from $WHEELS)"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
"$WORK/venv/bin/pip" install -q --prefer-binary --find-links "$WHEELS" "${WHEEL}[demo]"
cd "$WORK"  # nothing of the source tree on sys.path from here on
"$WORK/venv/bin/python" -c 'import aivailable, sys; assert "site-packages" in aivailable.__file__, aivailable.__file__'

echo "== wheel smoke: aivailable doctor"
rc=0
"$WORK/venv/bin/aivailable" doctor > doctor.txt || rc=$?
cat doctor.txt
if [ "$rc" -gt 1 ]; then echo "doctor exited with $rc"; exit 1; fi
grep -q "^Verdict: " doctor.txt && grep -q "^What to install" doctor.txt

echo "== wheel smoke: aivailable up --demo"
PORT=$("$WORK/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$WORK/venv/bin/aivailable" up --demo --host 127.0.0.1 --port "$PORT" --no-mdns --state-dir "$WORK/state" \
  > node.log 2>&1 &
NODE_PID=$!
"$WORK/venv/bin/python" - "$PORT" <<'PY'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.load(r)
deadline = time.monotonic() + 600
while True:  # /health, then a completion (the demo's models load after the node is up)
    try:
        if get("/health")["status"] == "ok":
            body = json.dumps({"model": "gemma-3-270m", "prompt": "The capital of France is", "max_tokens": 4}).encode()
            req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                out = json.load(r)
            assert out["choices"][0]["finish_reason"] in ("length", "stop") and out["usage"]["completion_tokens"] >= 1, out
            print("completion:", json.dumps(out["choices"][0]["text"]), out["usage"])
            break
    except (OSError, ValueError, KeyError) as exc:
        if time.monotonic() > deadline:
            raise SystemExit(f"no completion within 600 s: {exc}")
        time.sleep(1)
PY
kill -TERM "$NODE_PID"
rc=0
wait "$NODE_PID" || rc=$?
NODE_PID=
tail -n 5 node.log
if [ "$rc" -ne 0 ]; then echo "the node exited with $rc after SIGTERM"; cat node.log; exit 1; fi
echo "== wheel smoke: passed"
