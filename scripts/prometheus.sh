#!/usr/bin/env bash
# Debian's Prometheus and promtool, unpacked into the checkout (.tools/prometheus), never installed as a service.
#   scripts/prometheus.sh install|path promtool|path prometheus
# The metrics test runs `promtool check metrics` on the server's /metrics (tests/serving/telemetry/test_promtool.py);
# the chaos soak (scripts/bench/chaos_soak.py) runs its own `prometheus` on loopback to scrape it. The Debian
# package `prometheus` holds both static binaries; `apt-get install prometheus` would also start a system
# service on :9090, so the package is only downloaded and unpacked here.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/prometheus"

binary() { echo "$DEST/usr/bin/$1"; }

case "${1:-install}" in
  path)
    tool="${2:-promtool}"
    p="$(binary "$tool")"; [ -x "$p" ] || { echo "$tool not unpacked: run scripts/prometheus.sh install" >&2; exit 1; }
    echo "$p" ;;
  install)
    if [ -x "$(binary promtool)" ] && [ -x "$(binary prometheus)" ]; then exit 0; fi
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "prometheus is missing and there is no apt-get: put prometheus and promtool under $DEST/usr/bin" >&2
      exit 1
    fi
    work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
    echo "unpacking Debian's prometheus into .tools/prometheus ..." >&2
    if ! (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1); then
      if [ "$(id -u)" -ne 0 ]; then
        echo "apt-get download prometheus failed: run 'sudo apt-get update' and try again" >&2
        exit 1
      fi
      apt-get update -qq >/dev/null
      (cd "$work" && apt-get download -qq prometheus >/dev/null)
    fi
    mkdir -p "$DEST"
    dpkg-deb -x "$work"/prometheus_*.deb "$DEST"
    "$(binary promtool)" --version >/dev/null ;;
  *)
    echo "usage: $0 install|path promtool|path prometheus" >&2; exit 2 ;;
esac
