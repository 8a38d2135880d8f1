#!/usr/bin/env bash
# Debian's headless-capable Chromium for the browser tests (tests/serving/api/test_browser.py) and the WebRTC bench.
#   scripts/chromium.sh install|path
# Playwright (requirements.txt) drives this binary through executable_path; its own browser download
# is never used.
set -euo pipefail

find_chromium() { command -v chromium || command -v chromium-browser || true; }

case "${1:-install}" in
  path)
    p="$(find_chromium)"; [ -n "$p" ] || { echo "chromium not installed" >&2; exit 1; }; echo "$p" ;;
  install)
    if [ -n "$(find_chromium)" ]; then exit 0; fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
      echo "chromium is missing: run 'sudo apt-get install -y chromium' (the browser tests need it)" >&2
      exit 1
    fi
    echo "installing chromium ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq chromium >/dev/null ;;
  *)
    echo "usage: $0 install|path" >&2; exit 2 ;;
esac
