#!/usr/bin/env bash
# Create .venv-agents (Python 3.11) with the agent integrations of the client (pipecat-ai, livekit-agents) and their test tools,
# from clients/python/requirements-agents.txt. Idempotent: does nothing while .venv-agents/.installed is newer
# than the requirement files. Apart from .venv: pipecat-ai needs protobuf >= 5.29.6, the server's mediapipe < 5.
#
#   bash scripts/agents_venv.sh            # then: .venv-agents/bin/python -m pytest clients/python/tests
#
# Environment: AGENTS_VENV (default .venv-agents), PYTHON (default: the first of python3.11, python3.12, python3
# that is >= 3.11).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${AGENTS_VENV:-.venv-agents}"
REQ=clients/python/requirements-agents.txt
STAMP="$VENV/.installed"

up_to_date() {
  [ -f "$STAMP" ] || return 1
  local f
  for f in "$REQ" clients/python/requirements.txt clients/python/pyproject.toml "${BASH_SOURCE[0]}"; do
    [ "$STAMP" -nt "$f" ] || return 1
  done
}

pick_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "Python >= 3.11 not found (install python3.11)" >&2
  return 1
}

if up_to_date; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  PY="$(pick_python)"
  "$PY" -m venv "$VENV" || { rm -rf "$VENV"; echo "cannot create $VENV: install python3-venv" >&2; exit 1; }
fi
echo "installing the agent integrations into $VENV ($REQ; first run: about a minute) ..."
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ" >"$VENV/pip.log" 2>&1; then
  grep -v "^WARNING: Location" "$VENV/pip.log" | tail -40 >&2
  echo "pip install failed; full log in $VENV/pip.log" >&2
  exit 1
fi
# The point of this virtualenv: the framework's protobuf, and nothing of the server's heavy stack.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import sys

protobuf = tuple(int(p) for p in md.version("protobuf").split(".")[:3])
heavy: list[str] = []
for name in ("torch", "mediapipe", "opencv-contrib-python"):
    try:
        md.version(name)
        heavy.append(name)
    except md.PackageNotFoundError:
        pass
if protobuf < (5, 29, 6) or heavy:
    sys.exit(f"unexpected agents venv: protobuf {md.version('protobuf')}, server packages {heavy}")
PY
touch "$STAMP"
echo "agents virtualenv ready: $VENV"
