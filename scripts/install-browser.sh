#!/usr/bin/env bash
# Install Debian's Chromium, which the web viewer's tests drive headless through Playwright
# (Playwright is never asked to download a browser of its own). Safe to re-run.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" = 0 ]; then
  echo "Installing Debian's chromium for the viewer tests (about 150 MB, once)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
  echo "warning: /usr/bin/chromium is missing (the viewer tests need it): as root, apt-get install -y chromium chromium-driver" >&2
fi
