#!/usr/bin/env bash
# The browser tests' tools (tests/test_comfy_browser.py), idempotently:
#   chromium, node, npm   Debian packages (apt-get, as root; skipped when already on PATH)
#   .node/node_modules/   puppeteer-core, pinned (npm; drives Debian's chromium, downloads no browser)
# Called by scripts/test.sh. Where the tools cannot be installed (no root, no apt-get) it says so and
# returns 0: the browser tests then skip locally, and fail under CI=true.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PUPPETEER_CORE_VERSION="24.43.1"  # the 24 line runs on Debian's node 18; 25 needs node >= 22.12
NODE_DIR="$ROOT/.node"

log() { printf '[setup] %s\n' "$*" >&2; }

packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
command -v npm >/dev/null 2>&1 || packages+=(npm)
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${packages[*]} (apt-get) for the browser tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  else
    log "WARNING: ${packages[*]} missing and not installable here (needs root and apt-get); the browser tests will skip (fail under CI)"
    exit 0
  fi
fi

installed="$(node -p "require('$NODE_DIR/node_modules/puppeteer-core/package.json').version" 2>/dev/null || true)"
if [ "$installed" != "$PUPPETEER_CORE_VERSION" ]; then
  log "installing puppeteer-core@$PUPPETEER_CORE_VERSION into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  # No package.json in the checkout: --prefix keeps node_modules (and npm's lock) inside .node/.
  npm install --prefix "$NODE_DIR" --no-audit --no-fund --no-save --loglevel=error \
    "puppeteer-core@$PUPPETEER_CORE_VERSION" >/dev/null
fi
log "ready: browser tests ($(chromium --version 2>/dev/null | head -1), node $(node --version), puppeteer-core $PUPPETEER_CORE_VERSION)"
