#!/usr/bin/env bash
# Copies the Envoy Gateway reference data the tests use from an Envoy Gateway checkout into
# tests/fixtures/envoy-gateway/ (see its README). Usage: refresh-envoy-gateway-fixtures.sh CHECKOUT
set -euo pipefail
src=${1:?usage: $0 ENVOY_GATEWAY_CHECKOUT}
cd "$(dirname "$0")/.."
dst=tests/fixtures/envoy-gateway

need() { [ -e "$src/$1" ] || { echo "$src/$1: not found; is $src an Envoy Gateway checkout?" >&2; exit 1; }; }
need LICENSE
need charts/gateway-helm/crds/generated
need charts/gateway-helm/crds/gatewayapi-crds.yaml
need internal/xds/translator/testdata/out/xds-ir
need internal/gatewayapi/testdata

cp "$src/LICENSE" "$dst/LICENSE"
for kind in envoyextensionpolicies backendtrafficpolicies envoyproxies backends; do
  cp "$src/charts/gateway-helm/crds/generated/gateway.envoyproxy.io_$kind.yaml" "$dst/crds/"
done
cp "$src/charts/gateway-helm/crds/gatewayapi-crds.yaml" "$dst/crds/"
for sample in wasm load-balancer retry health-check passive-failure-percentage; do
  for part in clusters endpoints listeners routes; do
    cp "$src/internal/xds/translator/testdata/out/xds-ir/$sample.$part.yaml" "$dst/xds-samples/"
  done
done
for f in envoyextensionpolicy-with-wasm envoyextensionpolicy-with-wasm-invalid-configuration; do
  cp "$src/internal/gatewayapi/testdata/$f.in.yaml" "$src/internal/gatewayapi/testdata/$f.out.yaml" "$dst/policy-samples/"
done

commit=$(git -C "$src" rev-parse --short=8 HEAD 2>/dev/null || echo unknown)
sed -i -E "s/at commit \`[0-9a-f]+\`[^)]*\)/at commit \`$commit\` ($(date +'%B %Y'))/" "$dst/README.md"
echo "copied Envoy Gateway $commit into $dst; review with git diff, then run make test"
