#!/usr/bin/env bash
# The README's test command: installs what the workspace's tests need beyond Rust
# when it is missing, then runs every test (`cargo test --workspace`, with any
# arguments given here added to it).
#
# Beyond Rust the tests need:
#   redis-server, redis-cli  the Redis backend's tests start real Redis Clusters
#                            (Debian: redis-server, redis-tools)
#   kill                     the end-to-end tests stop relays with SIGTERM (Debian: procps)
# As root on Debian or Ubuntu they are installed with apt-get; anywhere else this
# says what to install and stops before running anything.
set -euo pipefail
cd "$(dirname "$0")/.."

missing_commands=()
missing_packages=()
need() {
    local command="$1" package="$2"
    if ! type -P "$command" >/dev/null; then
        missing_commands+=("$command")
        case " ${missing_packages[*]} " in
            *" $package "*) ;;
            *) missing_packages+=("$package") ;;
        esac
    fi
}
need redis-server redis-server
need redis-cli redis-tools
need kill procps

if [ "${#missing_commands[@]}" -gt 0 ]; then
    echo "the tests need ${missing_commands[*]}: not found on PATH"
    if [ "$(id -u)" -eq 0 ] && type -P apt-get >/dev/null; then
        echo "installing ${missing_packages[*]} with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq "${missing_packages[@]}" >/dev/null 2>&1 ||
            { apt-get update -qq && apt-get install -y -qq "${missing_packages[@]}" >/dev/null; }
    else
        cat <<EOF
Install them, then run this again:
  Debian or Ubuntu:  sudo apt-get install ${missing_packages[*]}
  macOS (Homebrew):  brew install redis
  elsewhere:         Redis 7 or Valkey (redis-server and redis-cli on PATH),
                     and a kill command (procps)
The Redis tests start their own clusters on free loopback ports (never 6379) and
stop them afterwards; nothing needs to be running.
EOF
        exit 1
    fi
    for command in "${missing_commands[@]}"; do
        type -P "$command" >/dev/null || { echo "$command is still not on PATH after installing"; exit 1; }
    done
fi

exec cargo test --workspace "$@"
