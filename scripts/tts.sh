#!/usr/bin/env bash
# Text-to-speech engine for POST /speak and the WebSocket's text messages: espeak-ng (Debian).
#
#   scripts/tts.sh install|check
#
# install: as root, apt-get installs espeak-ng when missing (retrying while another apt holds the
# dpkg lock); as another user, says what to run. check: exit 1 when espeak-ng is missing.
set -euo pipefail

have() { command -v espeak-ng >/dev/null 2>&1; }

install() {
  if have; then return 0; fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "espeak-ng is missing: run 'sudo apt-get install -y espeak-ng'" >&2
    exit 1
  fi
  echo "installing espeak-ng ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if apt-get update -qq >/dev/null 2>&1 \
      && apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null 2>&1; then
      return 0
    fi
    echo "apt-get failed (dpkg lock held by another apt?), retry $attempt in 15 s ..." >&2
    sleep 15
  done
  echo "could not install espeak-ng" >&2
  exit 1
}

case "${1:-}" in
  install) install ;;
  check) have || { echo "espeak-ng is missing (scripts/tts.sh install)" >&2; exit 1; } ;;
  *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
