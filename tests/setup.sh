#!/usr/bin/env bash
# Installs what antnest needs on a fresh machine with a Rust toolchain:
# the wasm targets for Rust jobs, componentize-py for Python jobs, and for
# the native Python runtime bubblewrap (Debian's, where apt can) and numpy
# (for its sample job).
# Idempotent; safe to run before every command.
set -euo pipefail
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null 2>&1 || rustup target add wasm32-wasip2
if ! command -v componentize-py >/dev/null 2>&1 || ! componentize-py --version 2>/dev/null | grep -q '0\.25\.1'; then
    python3 -m pip install --quiet --disable-pip-version-check componentize-py==0.25.1
    hash -r
fi
if ! command -v componentize-py >/dev/null 2>&1; then
    echo "componentize-py was installed but is not on PATH; add $(python3 -m site --user-base)/bin to PATH" >&2
    exit 1
fi
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    ($SUDO apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
        || ($SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq bubblewrap >/dev/null 2>&1)) \
        || echo "note: could not install bubblewrap; the native Python runtime's tests will be skipped" >&2
fi
if ! python3 -c "import numpy" >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check numpy \
        || echo "note: could not install numpy; the numpy sample's test will be skipped" >&2
fi
