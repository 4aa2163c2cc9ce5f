#!/usr/bin/env bash
# Builds haven-ffi and generates its Kotlin, Swift and Python bindings with the
# workspace's own uniffi-bindgen (the same UniFFI version as the library).
#
#   client-sdk/ffi/generate-bindings.sh [PROFILE] [OUT_DIR]
#
# PROFILE: dev (default), release, or mobile (size-focused: the one to ship).
# OUT_DIR: defaults to target/bindings. It gets kotlin/, swift/ and python/;
# python/ and kotlin/ also get a link to the host's built library, so
# tests can load them from there. Android and iOS builds cross-compile the same
# crate for their targets (see docs/mobile.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${1:-dev}"
out="${2:-target/bindings}"
case "$profile" in
    dev) dir=debug ;;
    *) dir="$profile" ;;
esac
cargo build --locked --profile "$profile" -p haven-ffi -p uniffi-bindgen
library="target/$dir/libhaven_ffi.so"
bindgen="target/$dir/uniffi-bindgen"
rm -rf "$out"
for language in kotlin swift python; do
    "$bindgen" generate --no-format --library "$library" --language "$language" \
        --out-dir "$out/$language" >/dev/null
done
ln -s "$PWD/$library" "$out/python/"
ln -s "$PWD/$library" "$out/kotlin/"
echo "bindings in $out (library: $library, $(stat -c %s "$library") bytes)"
