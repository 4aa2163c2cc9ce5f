"""Checks haven_wire.py against proto/testvectors and, given a relay, against it.

Usage: test_wire.py --vectors DIR [--proto DIR --relay HOST:PORT]

The relay (tests/wire-client/run.sh starts one) must require Create stamps
(create_pow_required) so that the stamp is really checked. A plain runner:
each test is a function; the last line is "N passed, N failed".
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import haven_wire as wire  # noqa: E402

TESTS = []


def test(function):
    TESTS.append(function)
    return function


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def key_of(entry: dict) -> wire.Key:
    key = wire.Key(h(entry["seed_hex"]))
    assert key.public.hex() == entry["public_key_hex"], "public key from seed"
    return key


class Context:
    vectors: str = ""
    relay: wire.Relay | None = None
    info = None


def load(name: str) -> dict:
    with open(os.path.join(Context.vectors, name + ".json")) as file:
        return json.load(file)


# The vectors.


@test
def auth_request_payloads_and_signatures():
    requests = load("auth")["requests"]
    assert {r["method"] for r in requests} == set(wire.METHODS), "a vector per method"
    for vector in requests:
        key = key_of(vector["signer"])
        fields = [h(f) for f in vector["fields_hex"]]
        payload = wire.request_payload(
            vector["method"], h(vector["recipient_id_hex"]), vector["timestamp_ms"], h(vector["nonce_hex"]), fields
        )
        assert payload.hex() == vector["payload_hex"], vector["what"]
        signed = wire.sign_request(
            key, vector["method"], h(vector["recipient_id_hex"]), fields, vector["timestamp_ms"], h(vector["nonce_hex"])
        )
        assert signed.signature.hex() == vector["signature_hex"], vector["what"]
        assert wire.verify(key.public, payload, signed.signature)


@test
def auth_fields_are_the_documented_ones():
    by_what = {r["what"]: r for r in load("auth")["requests"]}
    fetch = by_what["Mailbox/Fetch, limit = 7"]
    assert fetch["fields_hex"] == [wire.u32be(7).hex()]
    create = by_what["Mailbox/Create, kind INTAKE; no recipient id yet"]
    assert create["recipient_id_hex"] == "" and create["fields_hex"] == ["02"]
    delete = by_what["Mailbox/Delete; no fields"]
    assert delete["payload_hex"].endswith("00000000")


@test
def send_payloads_and_signatures():
    for vector in load("auth")["sends"]:
        key = key_of(vector["signer"])
        payload = wire.send_payload(
            h(vector["sender_id_hex"]), h(vector["envelope_id_hex"]), vector["ttl_seconds"], h(vector["ciphertext_hex"])
        )
        assert len(payload) == 102
        assert payload.hex() == vector["payload_hex"]
        assert key.sign(payload).hex() == vector["signature_hex"]


@test
def intake_stamps():
    for vector in load("pow")["intake"]:
        args = (h(vector["sender_id_hex"]), h(vector["envelope_id_hex"]), h(vector["ciphertext_hex"]))
        at = vector["timestamp_ms"]
        preimage = wire.intake_preimage(*args, at, vector["stamp"])
        assert len(preimage) == 117
        assert preimage.hex() == vector["preimage_hex"]
        assert wire.sha256(preimage).hex() == vector["digest_hex"]
        assert wire.leading_zero_bits(wire.sha256(preimage)) == vector["leading_zero_bits"]
        assert wire.solve_intake_stamp(*args, at, vector["difficulty"]) == vector["stamp"]
        assert not wire.intake_stamp_ok(*args[:2], args[2] + b"x", at, vector["stamp"], vector["leading_zero_bits"])


@test
def create_stamps():
    for vector in load("pow")["create"]:
        key = key_of(vector["recipient_key"])
        nonce, counter = wire.solve_create_nonce(
            key.public, vector["timestamp_ms"], h(vector["random_hex"]), vector["difficulty"]
        )
        assert counter == vector["counter"] and nonce.hex() == vector["nonce_hex"]
        preimage = wire.create_preimage(key.public, vector["timestamp_ms"], nonce)
        assert len(preimage) == 83
        assert preimage.hex() == vector["preimage_hex"]
        assert wire.sha256(preimage).hex() == vector["digest_hex"]
        signed = wire.sign_request(key, "Create", b"", [bytes([vector["kind"]])], vector["timestamp_ms"], nonce)
        assert signed.signature.hex() == vector["signature_hex"]


def prekey(entry: dict | None) -> dict | None:
    if entry is None:
        return None
    out = {"id": entry["id"], "public_key": h(entry["public_key_hex"]), "signature": h(entry["signature_hex"])}
    if "one_time" in entry:
        out["one_time"] = entry["one_time"]
    return out


@test
def upload_digests():
    vectors = load("keys")
    device = key_of(vectors["device"])
    for vector in vectors["uploads"]:
        identity = h(vector["identity_key_hex"])
        assert identity[:32] == device.public, "an identity starts with the device key"
        preimage = wire.upload_preimage(
            identity,
            prekey(vector["signed_prekey"]),
            prekey(vector["kem_last_resort"]),
            [prekey(p) for p in vector["one_time_prekeys"]],
            [prekey(p) for p in vector["kem_one_time_prekeys"]],
        )
        assert preimage.hex() == vector["preimage_hex"]
        assert wire.sha256(preimage).hex() == vector["digest_hex"]
    # auth.json's PublishPrekeys signs the first upload's digest.
    publish = [r for r in load("auth")["requests"] if r["method"] == "PublishPrekeys"][0]
    assert publish["fields_hex"] == [vectors["uploads"][0]["digest_hex"]]
    assert publish["recipient_id_hex"] == device.public.hex()


@test
def claim_stamps():
    for vector in load("keys")["claims"]:
        stamp_input = wire.claim_stamp_input(vector["timestamp_ms"])
        assert len(stamp_input) == 29 and stamp_input.hex() == vector["stamp_input_hex"]
        args = (h(vector["supporter_key_hex"]), h(vector["claim_nonce_hex"]), stamp_input)
        assert len(wire.claim_preimage(*args, vector["stamp"])) == 123
        assert wire.claim_preimage(*args, vector["stamp"]).hex() == vector["preimage_hex"]
        assert (
            wire.solve_claim_stamp(
                h(vector["supporter_key_hex"]), h(vector["claim_nonce_hex"]), vector["timestamp_ms"], vector["difficulty"]
            )
            == vector["stamp"]
        )


@test
def directory_documents():
    vectors = load("directory")
    for name, kind in [("supporter_entry", "SupporterEntry"), ("device_list", "DeviceList"), ("revocation", "Revocation")]:
        vector = vectors[name]
        key = key_of(vector["signer"])
        payload = wire.document_payload(kind, h(vector["body_hex"]))
        assert payload.hex() == vector["payload_hex"], name
        assert key.sign(payload).hex() == vector["signature_hex"], name
    entry = vectors["supporter_entry"]
    link = entry["link"]
    assert link.startswith(wire.LINK_PREFIX)
    encoded = link[len(wire.LINK_PREFIX) :]
    decoded = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    assert decoded.hex() == entry["signed_document_hex"]
    assert "=" not in encoded


# Against the relay.

PRIVATE, INTAKE = 1, 2


def relay() -> wire.Relay:
    if Context.relay is None:
        raise SkipTest("no relay given")
    return Context.relay


class SkipTest(Exception):
    pass


def info():
    relay()
    return Context.info


def expect_code(call, code_name: str):
    import grpc  # noqa: PLC0415

    try:
        call()
    except grpc.RpcError as error:
        assert error.code() == getattr(grpc.StatusCode, code_name), f"{error.code()}: {error.details()}"
        return error
    raise AssertionError(f"expected {code_name}, the call succeeded")


@test
def relay_requires_and_accepts_create_stamps():
    relay_info = info()
    assert relay_info.create_pow_required, "run.sh starts the relay with create_pow_required"
    key = wire.Key.generate()
    expect_code(lambda: relay().create(key, PRIVATE), "PERMISSION_DENIED")
    created = relay().create(key, PRIVATE, difficulty=relay_info.intake_pow_difficulty)
    assert len(created.recipient_id) == 16 and len(created.sender_id) == 16


@test
def a_stamped_create_sent_again_answers_the_same_mailbox():
    # docs/wire.md 5.3: the very same request sent again (a retry) answers the
    # same ids and makes no second mailbox; a new request makes a new one.
    difficulty = info().intake_pow_difficulty
    key = wire.Key.generate()
    timestamp_ms = int(time.time() * 1000)
    nonce, _ = wire.solve_create_nonce(key.public, timestamp_ms, os.urandom(8), difficulty)
    signed = wire.sign_request(key, "Create", b"", [bytes([PRIVATE])], timestamp_ms, nonce)
    first = relay().create(key, PRIVATE, signed=signed)
    again = relay().create(key, PRIVATE, signed=signed)
    assert (again.recipient_id, again.sender_id) == (first.recipient_id, first.sender_id)
    other = relay().create(key, PRIVATE, difficulty=difficulty)
    assert other.recipient_id != first.recipient_id


def new_mailbox(kind: int):
    key = wire.Key.generate()
    created = relay().create(key, kind, difficulty=info().intake_pow_difficulty)
    return key, created.recipient_id, created.sender_id


@test
def send_fetch_ack_on_an_unsecured_mailbox():
    key, recipient_id, sender_id = new_mailbox(PRIVATE)
    envelope_id = os.urandom(16)
    assert not relay().send(sender_id, envelope_id, b"hello from python").duplicate
    assert relay().send(sender_id, envelope_id, b"hello from python").duplicate
    fetched = relay().fetch(key, recipient_id, limit=10)
    assert [e.envelope_id for e in fetched.envelopes] == [envelope_id]
    assert fetched.envelopes[0].ciphertext == b"hello from python"
    assert not fetched.more
    assert relay().ack(key, recipient_id, [envelope_id]).deleted == 1
    assert list(relay().fetch(key, recipient_id).envelopes) == []


@test
def a_fetch_signed_by_another_key_or_replayed_is_refused():
    key, recipient_id, _ = new_mailbox(PRIVATE)
    expect_code(lambda: relay().fetch(wire.Key.generate(), recipient_id), "UNAUTHENTICATED")
    request = relay().fetch_request(key, recipient_id, limit=3)
    relay().mailbox.Fetch(request, timeout=10)
    expect_code(lambda: relay().mailbox.Fetch(request, timeout=10), "UNAUTHENTICATED")
    # The limit is signed: the same auth with another limit does not verify.
    signed = wire.sign_request(key, "Fetch", recipient_id, [wire.u32be(3)])
    other = relay().fetch_request(key, recipient_id, limit=4, signed=signed)
    expect_code(lambda: relay().mailbox.Fetch(other, timeout=10), "UNAUTHENTICATED")


@test
def a_secured_mailbox_takes_only_signed_sends():
    key, recipient_id, sender_id = new_mailbox(PRIVATE)
    sender = wire.Key.generate()
    relay().secure(key, recipient_id, sender.public)
    expect_code(lambda: relay().send(sender_id, os.urandom(16), b"unsigned"), "UNAUTHENTICATED")
    expect_code(
        lambda: relay().send(sender_id, os.urandom(16), b"wrong key", sender_key=wire.Key.generate()),
        "UNAUTHENTICATED",
    )
    envelope_id = os.urandom(16)
    relay().send(sender_id, envelope_id, b"signed", ttl_seconds=3600, sender_key=sender)
    fetched = relay().fetch(key, recipient_id)
    assert [e.ciphertext for e in fetched.envelopes] == [b"signed"]
    assert fetched.envelopes[0].expires_at >= int(time.time()) + 3600 - 5


@test
def an_intake_mailbox_takes_only_stamped_sends():
    key, recipient_id, sender_id = new_mailbox(INTAKE)
    difficulty = info().intake_pow_difficulty
    envelope_id = os.urandom(16)
    ciphertext = b"a first contact"
    expect_code(lambda: relay().send(sender_id, envelope_id, ciphertext), "PERMISSION_DENIED")
    now_ms = int(time.time() * 1000)
    # A stamp for other bytes does not carry over (find one that fails for these).
    other = wire.solve_intake_stamp(sender_id, envelope_id, ciphertext + b"!", now_ms, difficulty)
    while wire.intake_stamp_ok(sender_id, envelope_id, ciphertext, now_ms, other, difficulty):
        other = wire.solve_intake_stamp(sender_id, envelope_id, ciphertext + os.urandom(4), now_ms, difficulty)
    expect_code(
        lambda: relay().send(sender_id, envelope_id, ciphertext, pow_stamp=other, pow_timestamp_ms=now_ms),
        "PERMISSION_DENIED",
    )
    # Nor does a stamp older than the relay's window.
    old_ms = now_ms - info().intake_stamp_window_ms - 60_000
    old = wire.solve_intake_stamp(sender_id, envelope_id, ciphertext, old_ms, difficulty)
    expect_code(
        lambda: relay().send(sender_id, envelope_id, ciphertext, pow_stamp=old, pow_timestamp_ms=old_ms),
        "PERMISSION_DENIED",
    )
    stamp = wire.solve_intake_stamp(sender_id, envelope_id, ciphertext, now_ms, difficulty)
    relay().send(sender_id, envelope_id, ciphertext, pow_stamp=stamp, pow_timestamp_ms=now_ms)
    [stored] = relay().fetch(key, recipient_id).envelopes
    assert stored.ciphertext == ciphertext
    # Sent again after the ack, the same first contact is a duplicate and stores nothing.
    relay().ack(key, recipient_id, [envelope_id])
    again = relay().send(sender_id, envelope_id, ciphertext, pow_stamp=stamp, pow_timestamp_ms=now_ms)
    assert again.duplicate
    assert list(relay().fetch(key, recipient_id).envelopes) == []


@test
def receive_streams_the_backlog_then_queue_empty():
    key, recipient_id, sender_id = new_mailbox(PRIVATE)
    ids = [os.urandom(16) for _ in range(2)]
    for index, envelope_id in enumerate(ids):
        relay().send(sender_id, envelope_id, b"message %d" % index)
    messages = relay().receive_first(key, recipient_id, window=8, count=3)
    assert [m.WhichOneof("kind") for m in messages] == ["envelope", "envelope", "queue_empty"]
    assert [m.envelope.envelope_id for m in messages[:2]] == ids


@test
def delete_removes_the_mailbox():
    key, recipient_id, sender_id = new_mailbox(PRIVATE)
    relay().delete(key, recipient_id)
    expect_code(lambda: relay().fetch(key, recipient_id), "NOT_FOUND")
    expect_code(lambda: relay().send(sender_id, os.urandom(16), b"late"), "NOT_FOUND")


@test
def a_keys_request_signed_by_the_device_key_verifies():
    device = wire.Key.generate()
    supporter_key = os.urandom(32)
    # Signed correctly: the relay gets past the signature to "unknown device".
    expect_code(lambda: relay().prekey_count(device, supporter_key), "NOT_FOUND")
    expect_code(lambda: relay().prekey_count(device, supporter_key, tamper=True), "UNAUTHENTICATED")
    # Without the supporter's key the relay cannot say which prekeys are meant.
    expect_code(lambda: relay().prekey_count(device, b""), "INVALID_ARGUMENT")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", required=True)
    parser.add_argument("--proto")
    parser.add_argument("--relay")
    args = parser.parse_args()
    Context.vectors = args.vectors
    stubs = tempfile.TemporaryDirectory(prefix="haven-wire-stubs-")
    if args.relay:
        wire.generate_stubs(args.proto, stubs.name)
        Context.relay = wire.Relay(args.relay)
        Context.info = Context.relay.info()
    passed = failed = skipped = 0
    for function in TESTS:
        try:
            function()
        except SkipTest as skip:
            skipped += 1
            print(f"skip {function.__name__}: {skip}")
            continue
        except Exception:  # noqa: BLE001 - report every failure and go on
            failed += 1
            print(f"FAIL {function.__name__}")
            traceback.print_exc()
            continue
        passed += 1
        print(f"ok   {function.__name__}")
    if Context.relay is not None:
        Context.relay.close()
    stubs.cleanup()
    line = f"{passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    print(line)
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
