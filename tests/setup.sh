#!/usr/bin/env bash
# Installs what antnest needs on a fresh machine with a Rust toolchain:
# the wasm targets for Rust jobs and componentize-py for Python jobs.
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
