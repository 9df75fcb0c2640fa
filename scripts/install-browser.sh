#!/usr/bin/env bash
# Chromium for the chat page's browser tests (tests/serving/ui): Debian's `chromium` package, driven by the
# Playwright wheel in the dev extra. Playwright's own browser download is never used (no network but the package
# registries). Does nothing when a Chromium is already on PATH; says why and exits 0 when it cannot install one
# (not root, no apt-get): the browser tests then skip with that reason, unless LORATUI_REQUIRE_BROWSER=1.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null; then
    echo "install-browser: $(command -v "$name") is there"
    exit 0
  fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-browser: no Chromium, and no root apt-get to install Debian's chromium package; the browser tests will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
echo "install-browser: $(chromium --version)"
