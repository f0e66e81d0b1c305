#!/usr/bin/env bash
# Installs Debian's chromium for the dashboard's browser tests when it is missing.
# Playwright drives this binary through executable_path; we never let Playwright download a
# browser of its own (pinned to nothing we control, and no network at test time).
# Safe to run any number of times.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# fonts-liberation: metric-compatible fonts so screenshots and layout do not depend on
# whatever fallback font happens to be present.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
echo "chromium: installed ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
