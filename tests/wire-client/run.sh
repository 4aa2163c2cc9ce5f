#!/usr/bin/env bash
# The wire client from docs/wire.md alone (haven_wire.py), checked against the
# known-answer vectors in proto/testvectors and against a real relay: Create
# with a proof-of-work stamp in its nonce, Secure, Send (unsigned, signed,
# stamped), Fetch, Ack, Receive, Delete and a Keys request. Called by .ci/run,
# which passes its release relay as HAVEN_RELAY_BIN; without it the relay is
# built here (debug).
#
# Installs what it needs when missing: grpcio and grpcio-tools (stubs are
# generated from proto/ into a temporary directory) and cryptography, from PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"

if ! python3 -c 'import grpc, grpc_tools, cryptography' 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools cryptography
fi
if [ -n "${HAVEN_RELAY_BIN:-}" ]; then
    relay="$HAVEN_RELAY_BIN"
else
    cargo build --locked -p haven-server --bin haven-relay
    relay="$root/target/debug/haven-relay"
fi
[ -x "$relay" ] || { echo "no executable at $relay (HAVEN_RELAY_BIN)"; exit 1; }

work="$(mktemp -d)"
relay_pid=""
cleanup() {
    if [ -n "$relay_pid" ]; then kill "$relay_pid" 2>/dev/null || true; wait "$relay_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
# Create stamps required, so the client's stamp is really checked; a low
# difficulty keeps the pure-Python solver quick.
cat >"$work/relay.toml" <<'TOML'
intake_pow_difficulty = 12
create_pow_required = true
TOML
address="127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$relay" --config "$work/relay.toml" --listen "$address" --metrics-listen off \
    --data-dir "$work/haven-data" 2>"$work/relay.log" &
relay_pid=$!
ready=""
for _ in $(seq 1 100); do
    if python3 -c 'import socket, sys; host, port = sys.argv[1].split(":"); socket.create_connection((host, int(port)), 0.2)' "$address" 2>/dev/null; then
        ready=1
        break
    fi
    kill -0 "$relay_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$ready" ]; then
    cat "$work/relay.log"
    echo "the relay did not start listening on $address"
    exit 1
fi

status=0
python3 tests/wire-client/test_wire.py --vectors proto/testvectors --proto proto --relay "$address" || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- relay log"
    tail -40 "$work/relay.log"
fi
exit "$status"
