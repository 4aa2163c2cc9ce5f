#!/usr/bin/env bash
# The bindings tested from the foreign languages, against real relay processes:
# generates the Kotlin, Swift and Python bindings, runs the Python conversation
# test, compiles and runs the Kotlin one on the JVM (JNA), and checks the Swift
# bindings exist (no Swift compiler on Linux). Called by .ci/run, which passes
# its release builds as HAVEN_RELAY_BIN and HAVEN_CLI_BIN; without them the
# relay and CLI are built here (debug).
#
# Installs what it needs when missing: JNA from Debian (libjna-java), and the
# Kotlin 2.x compiler with kotlinx-coroutines from the PyPI wheel
# kotlin-jupyter-kernel (Debian's kotlin is 1.3, too old), cached in
# ${HAVEN_TOOLS_CACHE:-~/.cache/haven-tools}.
set -euo pipefail
cd "$(dirname "$0")/../../.."
root="$PWD"
bindings="$root/target/bindings"

client-sdk/ffi/generate-bindings.sh dev "$bindings"
# The relay and CLI to talk to: given (.ci/run passes its release builds), or built here.
if [ -n "${HAVEN_RELAY_BIN:-}" ] && [ -n "${HAVEN_CLI_BIN:-}" ]; then
    relay="$HAVEN_RELAY_BIN"
    haven="$HAVEN_CLI_BIN"
else
    cargo build --locked -p haven-server -p haven-cli
    relay="$root/target/debug/haven-relay"
    haven="$root/target/debug/haven"
fi
for binary in "$relay" "$haven"; do
    [ -x "$binary" ] || { echo "no executable at $binary (HAVEN_RELAY_BIN / HAVEN_CLI_BIN)"; exit 1; }
done

echo "== Swift: generated (compiling them needs macOS)"
for file in HavenSDK.swift HavenSDKFFI.h HavenSDKFFI.modulemap; do
    test -s "$bindings/swift/$file" || { echo "missing Swift binding $file"; exit 1; }
done
grep -q "func startConversation(supporterKey: String, text: String) async throws" "$bindings/swift/HavenSDK.swift"
echo "Swift bindings present, with async calls"

echo "== Python"
python3 client-sdk/ffi/tests/conversation.py "$bindings/python" "$relay" "$haven"

echo "== Kotlin (JVM)"
jna=/usr/share/java/jna.jar
if [ ! -f "$jna" ]; then
    apt-get install -y -qq libjna-java libjna-jni >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq libjna-java libjna-jni >/dev/null; }
fi
cache="${HAVEN_TOOLS_CACHE:-$HOME/.cache/haven-tools}/kotlin-jupyter-kernel-0.19.0.944"
jars="$cache/run_kotlin_kernel/jars"
if [ ! -f "$jars/kotlin-jupyter-kernel-0.19.0-944-all.jar" ]; then
    mkdir -p "$cache"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        kotlin-jupyter-kernel==0.19.0.944 -d "$cache"
    (cd "$cache" && python3 -m zipfile -e kotlin_jupyter_kernel-0.19.0.944-py3-none-any.whl . &&
        rm -f kotlin_jupyter_kernel-0.19.0.944-py3-none-any.whl)
fi
classpath="$jars/kotlin-jupyter-kernel-0.19.0-944-all.jar:$jars/kotlin-stdlib-2.3.10-RC.jar:$jna"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
java -cp "$classpath" org.jetbrains.kotlin.cli.jvm.K2JVMCompiler -no-stdlib -nowarn \
    -cp "$classpath" "$bindings/kotlin/org/haven/sdk/haven_ffi.kt" client-sdk/ffi/tests/Conversation.kt \
    -d "$out/conversation.jar"
java -Djna.library.path="$bindings/kotlin" -cp "$out/conversation.jar:$classpath" \
    ConversationKt "$relay" "$haven"
