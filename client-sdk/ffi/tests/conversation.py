"""A whole Haven conversation through the generated Python bindings, against a
real relay process on a loopback port: a supporter registers (the association
signs them with the `haven` CLI), a help-seeker finds them in the verified
directory and writes anonymously, the supporter answers through a listener,
both see the same safety number, the retention is agreed, and the help-seeker
ends it so that nothing is left on either device. Errors arrive as typed
exceptions.

    python3 client-sdk/ffi/tests/conversation.py BINDINGS_DIR RELAY_BIN HAVEN_BIN

BINDINGS_DIR is the python/ directory generate-bindings.sh writes (the module
and the library). Prints `N passed, N failed` and exits non-zero on failure.
"""

import asyncio
import gc
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

bindings, relay_bin, haven_bin = sys.argv[1:4]
sys.path.insert(0, bindings)
import haven_ffi as haven  # noqa: E402

passed = 0
failed = 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, tries=200):
    for _ in range(tries):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class PushReceiver:
    """Stands in for a push gateway: records the bodies POSTed to it."""

    def __init__(self):
        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/wake"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    async def wait_for(self, count, seconds=10):
        deadline = time.monotonic() + seconds
        while len(self.bodies) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return list(self.bodies)


class Listener(haven.EventListener):
    """Collects events from the library's thread."""

    def __init__(self):
        self.events = []
        self.errors = []

    def on_event(self, event):
        self.events.append(event)

    def on_error(self, message):
        self.errors.append(message)


async def wait_for(listener, kind, conversation=None, seconds=20):
    """The first collected event of `kind` (for `conversation`), waiting a bounded time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for event in listener.events:
            if isinstance(event, kind) and (
                conversation is None or event.conversation == conversation
            ):
                listener.events.remove(event)
                return event
        await asyncio.sleep(0.05)
    return None


async def expect_error(name, kind, call):
    try:
        result = call()
        if asyncio.iscoroutine(result):
            await result
    except kind as error:
        check(name, str(error) != "", "(empty message)")
        return
    except Exception as error:  # noqa: BLE001 - report what came instead
        check(name, False, f"got {type(error).__name__}: {error}")
        return
    check(name, False, "no error")


async def conversation(work, url, association):
    def open_client(name, key_byte):
        return haven.HavenClient.open(
            haven.ClientConfig(
                relay_url=url,
                association_key=bytes.fromhex(association),
                data_dir=os.path.join(work, name),
                storage_key=bytes([key_byte]) * 32,
            )
        )

    # A supporter: identity on the device, signed by the association, device
    # registered, open for one new conversation.
    supporter = open_client("supporter", 1)
    key = supporter.create_supporter_identity()
    check("supporter key is 32 bytes of hex", len(bytes.fromhex(key)) == 32)
    subprocess.run(
        [haven_bin, "association", "sign-supporter",
         "--key", os.path.join(work, "association.key"), "--supporter-key", key,
         "--name", "Kari Nordmann", "--specialty", "general practice",
         "--county", "Vestland", "--town", "Bergen", "--language", "nb",
         "--relay", url],
        check=True, stdout=subprocess.DEVNULL,
    )
    await supporter.register_supporter_device()
    await supporter.set_capacity(1)
    listener = Listener()
    supporter.watch(listener)

    # A help-seeker finds them, verified, and writes first.
    seeker = open_client("seeker", 2)
    found = await seeker.list_supporters(haven.DirectoryFilter(county="Vestland"))
    check("the directory lists the supporter", [p.display_name for p in found] == ["Kari Nordmann"])
    check("the supporter takes new conversations", found and found[0].taking_new_conversations)
    nobody = await seeker.list_supporters(haven.DirectoryFilter(county="Finnmark"))
    check("filters apply", nobody == [])
    first = "I'm a GP and I can't sleep. Can we talk?"
    mine = await seeker.start_conversation(found[0].key, first)
    check("start_conversation returns an id", len(bytes.fromhex(mine)) == 16)

    started = await wait_for(listener, haven.HavenEvent.CONVERSATION_STARTED)
    check("the supporter's listener gets the first message", started is not None and started.text == first)
    theirs = started.conversation if started else ""
    their_number = await wait_for(listener, haven.HavenEvent.SAFETY_NUMBER, theirs)
    check("and a safety number", their_number is not None)

    await supporter.send(theirs, "Of course. I'm here.")
    events = await seeker.sync_once()
    texts = [e.text for e in events if isinstance(e, haven.HavenEvent.MESSAGE_RECEIVED)]
    check("sync_once brings the answer", texts == ["Of course. I'm here."], repr(events))
    numbers = [e.number for e in events if isinstance(e, haven.HavenEvent.SAFETY_NUMBER)]
    check(
        "both sides see the same safety number",
        their_number is not None and numbers == [their_number.number] == seeker.safety_numbers(mine),
    )

    # Push: the help-seeker's phone is woken for the next answer, content-free.
    phone = PushReceiver()
    await seeker.register_conversation_push(mine, phone.url, b"seeker-phone")
    await supporter.send(theirs, "Take your time.")
    wakes = await phone.wait_for(1)
    check("a push wakes the help-seeker, carrying only the token", wakes == [b'{"token":"c2Vla2VyLXBob25l"}'], repr(wakes))
    events = await seeker.sync_once()
    check(
        "and sync_once on wake-up brings the message",
        [e.text for e in events if isinstance(e, haven.HavenEvent.MESSAGE_RECEIVED)] == ["Take your time."],
    )
    await seeker.register_conversation_push(mine, "", b"")
    phone.server.shutdown()

    await seeker.send(mine, "Thank you.")
    received = await wait_for(listener, haven.HavenEvent.MESSAGE_RECEIVED, theirs)
    check("the listener gets the next message", received is not None and received.text == "Thank you.")
    history = seeker.history(mine)
    check(
        "history, oldest first",
        [(e.author, e.text) for e in history]
        == [
            (haven.Author.ME, first),
            (haven.Author.THEM, "Of course. I'm here."),
            (haven.Author.THEM, "Take your time."),
            (haven.Author.ME, "Thank you."),
        ],
    )

    # The retention is the conversation's.
    await supporter.set_retention(theirs, 3600)
    events = await seeker.sync_once()
    check(
        "the retention reaches the other side",
        any(isinstance(e, haven.HavenEvent.RETENTION_CHANGED) and e.seconds == 3600 for e in events),
    )
    check("and applies there", seeker.retention(mine) == haven.Retention(seconds=3600, keep_transcript=False))

    # Errors are typed, with messages.
    other = open_client("other", 3)
    await expect_error(
        "a full supporter refuses clearly", haven.HavenError.NotTakingConversations,
        lambda: other.start_conversation(found[0].key, "Hello?"),
    )
    await expect_error(
        "an unknown conversation", haven.HavenError.UnknownConversation,
        lambda: seeker.send("00" * 16, "hello"),
    )
    await expect_error(
        "a malformed id", haven.HavenError.InvalidArgument,
        lambda: seeker.send("not hex", "hello"),
    )
    await expect_error(
        "only the help-seeker keeps a transcript", haven.HavenError.OnlyHelpSeeker,
        lambda: supporter.keep_transcript(theirs, True),
    )
    closed = open_client("closed", 5)
    del closed
    gc.collect()
    await expect_error(
        "the wrong storage key", haven.HavenError.WrongStorageKey,
        lambda: open_client("closed", 9),
    )
    await expect_error(
        "a data directory another client holds", haven.HavenError.Storage,
        lambda: open_client("seeker", 2),
    )
    await expect_error(
        "a short storage key", haven.HavenError.InvalidArgument,
        lambda: haven.HavenClient.open(haven.ClientConfig(
            relay_url=url, association_key=bytes.fromhex(association),
            data_dir=os.path.join(work, "short"), storage_key=b"short")),
    )
    await expect_error(
        "plaintext to a remote relay", haven.HavenError.BadRelayAddress,
        lambda: haven.HavenClient.open(haven.ClientConfig(
            relay_url="http://192.0.2.1:50051", association_key=bytes.fromhex(association),
            data_dir=os.path.join(work, "remote"), storage_key=bytes(32))),
    )

    await expect_error(
        "a proxy that is not SOCKS5", haven.HavenError.BadRelayAddress,
        lambda: haven.HavenClient.open(haven.ClientConfig(
            relay_url=url, association_key=bytes.fromhex(association),
            data_dir=os.path.join(work, "proxied"), storage_key=bytes(32),
            proxy="http://127.0.0.1:8080")),
    )
    check("nothing waits to be posted", seeker.queued_envelopes() == 0)
    seeker.set_sync_spread_ms(500)
    await expect_error(
        "a sync spread over a minute", haven.HavenError.InvalidArgument,
        lambda: seeker.set_sync_spread_ms(60_001),
    )
    seeker.set_sync_spread_ms(0)

    # Devices: a laptop is linked by code (joining this supporter only), then removed.
    own = supporter.device_identity()
    check("the device list holds this device", supporter.supporter_devices() == [own])
    laptop = open_client("laptop", 4)
    code = await laptop.device_link_code(key)
    await supporter.approve_device(code)
    await laptop.sync_once()
    check("the laptop joins the list", sorted(supporter.supporter_devices()) == sorted([own, laptop.device_identity()]))
    await expect_error(
        "a device cannot remove itself", haven.HavenError.InvalidArgument,
        lambda: supporter.remove_device(own),
    )
    await supporter.remove_device(laptop.device_identity())
    check("and leaves it again", supporter.supporter_devices() == [own])

    # A data directory whose state is put back from an older copy is refused.
    rolled = open_client("rolled", 6)
    await rolled.device_link_code(key)
    del rolled
    gc.collect()
    state = os.path.join(work, "rolled", "state")
    shutil.copytree(state, os.path.join(work, "rolled-copy"))
    rolled = open_client("rolled", 6)
    await rolled.device_link_code(key)  # a new code: newer state
    del rolled
    gc.collect()
    shutil.rmtree(state)
    shutil.copytree(os.path.join(work, "rolled-copy"), state)
    await expect_error(
        "a data directory put back from an older copy", haven.HavenError.RolledBack,
        lambda: open_client("rolled", 6),
    )

    # The help-seeker ends it: gone on both sides.
    await seeker.end_conversation(mine)
    check("ended on the help-seeker's device", seeker.conversations() == [])
    ended = await wait_for(listener, haven.HavenEvent.CONVERSATION_ENDED, theirs)
    check("the supporter's listener learns it ended", ended is not None)
    check("and nothing is left there", supporter.conversations() == [])
    supporter.stop_watching()
    check("the listener saw no errors", listener.errors == [], repr(listener.errors))


def main():
    with tempfile.TemporaryDirectory() as work:
        association = subprocess.run(
            [haven_bin, "association", "init", "--key", os.path.join(work, "association.key")],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        port = free_port()
        with open(os.path.join(work, "relay.log"), "w") as log:
            relay = subprocess.Popen(
                [relay_bin, "--listen", f"127.0.0.1:{port}", "--metrics-listen", "off",
                 "--data-dir", os.path.join(work, "relay"), "--association-key", association,
                 "--push-allow-local-endpoints"],
                stderr=log,
            )
        try:
            if not wait_for_port(port):
                check("the relay starts", False)
            else:
                asyncio.run(asyncio.wait_for(conversation(work, f"http://127.0.0.1:{port}", association), 120))
        except Exception as error:  # noqa: BLE001 - count it, then show it
            check("the conversation runs to the end", False, f"{type(error).__name__}: {error}")
        finally:
            relay.terminate()
            relay.wait(timeout=30)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()
