#!/usr/bin/env bash
# Create .venv with Python >= 3.11 and install requirements.txt into it (idempotent).
# torch is pinned to 2.13.0 so pip takes the CPU wheel; GPU users install their CUDA build of
# torch==2.13.0 into .venv first (see README), and pip then keeps it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
cd "$ROOT"

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

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(pick_python)"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing the venv module for $PY ..."
      apt-get update -qq >/dev/null
      ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" >/dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      "$PY" -m venv "$VENV"
    else
      echo "cannot create a virtualenv: install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi

echo "installing Python packages into .venv (first run: a few minutes) ..."
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt >"$VENV/pip.log" 2>&1; then
  grep -v "^WARNING: Location" "$VENV/pip.log" | tail -40 >&2
  echo "pip install failed; full log in $VENV/pip.log" >&2
  exit 1
fi
touch "$VENV/.installed"
echo "virtualenv ready: $VENV"
