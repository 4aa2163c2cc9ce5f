"""Haven's wire rules in Python, written from docs/wire.md alone.

A third-party client's view of the relay: the signed payloads of requests
(section 3), the sender signature (4.1), the proof-of-work stamps (5), the
prekey-upload digest (6.1) and directory signatures (7), and a small gRPC
client over stubs generated from proto/ at run time. Ed25519 comes from the
`cryptography` package; everything else is the standard library.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# Section 1: notation.


def u32be(n: int) -> bytes:
    return struct.pack(">I", n)


def u64be(n: int) -> bytes:
    return struct.pack(">Q", n)


def lp32(data: bytes) -> bytes:
    return u32be(len(data)) + data


def lp64(data: bytes) -> bytes:
    return u64be(len(data)) + data


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Key:
    """An Ed25519 key from its 32-byte seed."""

    def __init__(self, seed: bytes):
        assert len(seed) == 32
        self.seed = seed
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> "Key":
        return cls(os.urandom(32))

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except Exception:  # noqa: BLE001 - any failure is "does not verify"
        return False


# Section 3: signed requests.

REQUEST_DOMAIN = b"haven.v1.request-auth"
NONCE_LEN = 16

# Section 3.2: the bare method names.
METHODS = (
    "Create",
    "Secure",
    "Receive",
    "Fetch",
    "Ack",
    "Delete",
    "RegisterPush",
    "PublishPrekeys",
    "PrekeyCount",
    "SetCapacity",
)


def request_payload(
    method: str, recipient_id: bytes, timestamp_ms: int, nonce: bytes, fields: list[bytes]
) -> bytes:
    assert method in METHODS, method
    assert len(nonce) == NONCE_LEN
    out = lp32(REQUEST_DOMAIN) + lp32(method.encode("ascii")) + lp32(recipient_id)
    out += u64be(timestamp_ms) + nonce + u32be(len(fields))
    for field in fields:
        out += lp32(field)
    return out


@dataclass
class SignedAuth:
    timestamp_ms: int
    nonce: bytes
    signature: bytes


def sign_request(
    key: Key,
    method: str,
    recipient_id: bytes,
    fields: list[bytes],
    timestamp_ms: int | None = None,
    nonce: bytes | None = None,
) -> SignedAuth:
    timestamp_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    nonce = os.urandom(NONCE_LEN) if nonce is None else nonce
    payload = request_payload(method, recipient_id, timestamp_ms, nonce, fields)
    return SignedAuth(timestamp_ms, nonce, key.sign(payload))


# Section 4.1: the sender signature.

SEND_DOMAIN = b"haven.v1.send-auth"


def send_payload(sender_id: bytes, envelope_id: bytes, ttl_seconds: int, ciphertext: bytes) -> bytes:
    return (
        lp32(SEND_DOMAIN)
        + lp32(sender_id)
        + lp32(envelope_id)
        + u64be(ttl_seconds)
        + sha256(ciphertext)
    )


# Section 5: proof-of-work stamps.

INTAKE_DOMAIN = b"haven.v1.intake-stamp"
CLAIM_STAMP_DOMAIN = b"haven.v1.intake-pow"
CLAIM_DOMAIN = b"haven.v1.bundle-claim"
CREATE_DOMAIN = b"haven.v1.create-pow"


def leading_zero_bits(digest: bytes) -> int:
    bits = 0
    for byte in digest:
        if byte == 0:
            bits += 8
            continue
        return bits + (8 - byte.bit_length())
    return bits


def intake_preimage(sender_id: bytes, envelope_id: bytes, ciphertext: bytes, timestamp_ms: int, stamp: int) -> bytes:
    return (
        INTAKE_DOMAIN + lp64(sender_id) + lp64(envelope_id) + sha256(ciphertext) + u64be(timestamp_ms) + u64be(stamp)
    )


def intake_stamp_ok(
    sender_id: bytes, envelope_id: bytes, ciphertext: bytes, timestamp_ms: int, stamp: int, difficulty: int
) -> bool:
    digest = sha256(intake_preimage(sender_id, envelope_id, ciphertext, timestamp_ms, stamp))
    return leading_zero_bits(digest) >= difficulty


def solve_intake_stamp(sender_id: bytes, envelope_id: bytes, ciphertext: bytes, timestamp_ms: int, difficulty: int) -> int:
    """The smallest stamp from 0 (the prefix is hashed once)."""
    prefix = hashlib.sha256(
        INTAKE_DOMAIN + lp64(sender_id) + lp64(envelope_id) + sha256(ciphertext) + u64be(timestamp_ms)
    )
    return _smallest(prefix, difficulty)


def claim_preimage(supporter_key: bytes, claim_nonce: bytes, stamp_input: bytes, stamp: int) -> bytes:
    return CLAIM_STAMP_DOMAIN + lp64(supporter_key) + lp64(claim_nonce) + sha256(stamp_input) + u64be(stamp)


def _smallest(prefix, difficulty: int) -> int:
    stamp = 0
    while True:
        hasher = prefix.copy()
        hasher.update(u64be(stamp))
        if leading_zero_bits(hasher.digest()) >= difficulty:
            return stamp
        stamp += 1


def claim_stamp_input(timestamp_ms: int) -> bytes:
    return CLAIM_DOMAIN + u64be(timestamp_ms)


def solve_claim_stamp(supporter_key: bytes, claim_nonce: bytes, timestamp_ms: int, difficulty: int) -> int:
    prefix = hashlib.sha256(
        CLAIM_STAMP_DOMAIN + lp64(supporter_key) + lp64(claim_nonce) + sha256(claim_stamp_input(timestamp_ms))
    )
    return _smallest(prefix, difficulty)


def create_preimage(recipient_key: bytes, timestamp_ms: int, nonce: bytes) -> bytes:
    return CREATE_DOMAIN + lp64(recipient_key) + u64be(timestamp_ms) + nonce


def create_stamp_ok(recipient_key: bytes, timestamp_ms: int, nonce: bytes, difficulty: int) -> bool:
    return leading_zero_bits(sha256(create_preimage(recipient_key, timestamp_ms, nonce))) >= difficulty


def solve_create_nonce(recipient_key: bytes, timestamp_ms: int, random8: bytes, difficulty: int) -> tuple[bytes, int]:
    """The nonce random8 ‖ u64be(counter) with the smallest counter from 0."""
    assert len(random8) == 8
    prefix = hashlib.sha256(CREATE_DOMAIN + lp64(recipient_key) + u64be(timestamp_ms))
    counter = 0
    while True:
        nonce = random8 + u64be(counter)
        hasher = prefix.copy()
        hasher.update(nonce)
        if leading_zero_bits(hasher.digest()) >= difficulty:
            return nonce, counter
        counter += 1


# Section 6.1: the prekey-upload digest.

UPLOAD_DOMAIN = b"haven.v1.prekey-upload"


def upload_preimage(
    identity_key: bytes,
    signed_prekey: dict | None,
    kem_last_resort: dict | None,
    one_time_prekeys: list[dict],
    kem_one_time_prekeys: list[dict],
) -> bytes:
    """Prekeys as dicts: id, public_key, signature (and one_time for KEM prekeys)."""

    def kem(prekey: dict | None) -> bytes:
        if prekey is None:
            return b"\x00"
        return (
            b"\x01"
            + u32be(prekey["id"])
            + bytes([1 if prekey["one_time"] else 0])
            + lp64(prekey["public_key"])
            + lp64(prekey["signature"])
        )

    out = UPLOAD_DOMAIN + lp64(identity_key)
    if signed_prekey is None:
        out += b"\x00"
    else:
        out += b"\x01" + u32be(signed_prekey["id"]) + lp64(signed_prekey["public_key"]) + lp64(signed_prekey["signature"])
    out += kem(kem_last_resort)
    out += u64be(len(one_time_prekeys))
    for prekey in one_time_prekeys:
        out += u32be(prekey["id"]) + lp64(prekey["public_key"]) + lp64(prekey["signature"])
    out += u64be(len(kem_one_time_prekeys))
    for prekey in kem_one_time_prekeys:
        out += kem(prekey)
    return out


# Section 7: directory documents.

DIRECTORY_DOMAINS = {
    "SupporterEntry": b"haven.v1.directory.supporter-entry",
    "DeviceList": b"haven.v1.directory.device-list",
    "Revocation": b"haven.v1.directory.revocation",
}
LINK_PREFIX = "haven:supporter:1:"


def document_payload(kind: str, body: bytes) -> bytes:
    return DIRECTORY_DOMAINS[kind] + body


# The gRPC client: stubs generated from proto/ into a temporary directory.


def generate_stubs(proto_root: str, out: str) -> None:
    """Runs grpc_tools.protoc over proto/haven/v1/*.proto into `out` and puts it
    on sys.path."""
    import importlib.resources  # noqa: PLC0415

    from grpc_tools import protoc  # noqa: PLC0415 - only needed for the live tests

    sources = sorted(
        os.path.join("haven", "v1", name)
        for name in os.listdir(os.path.join(proto_root, "haven", "v1"))
        if name.endswith(".proto")
    )
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    code = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *sources]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with {code}")
    sys.path.insert(0, out)


class Relay:
    """The calls a client makes, each built by hand from docs/wire.md."""

    def __init__(self, address: str):
        import grpc  # noqa: PLC0415
        from haven.v1 import keys_pb2_grpc, mailbox_pb2, mailbox_pb2_grpc, relay_pb2, relay_pb2_grpc  # noqa: PLC0415

        self.grpc = grpc
        self.pb = mailbox_pb2
        self.relay_pb = relay_pb2
        self.channel = grpc.insecure_channel(address)
        self.mailbox = mailbox_pb2_grpc.MailboxStub(self.channel)
        self.relay = relay_pb2_grpc.RelayStub(self.channel)
        self.keys = keys_pb2_grpc.KeysStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def auth(self, signed: SignedAuth):
        return self.pb.Auth(timestamp_ms=signed.timestamp_ms, nonce=signed.nonce, signature=signed.signature)

    def info(self):
        return self.relay.GetInfo(self.relay_pb.GetInfoRequest(), timeout=10)

    def create(self, key: Key, kind: int, difficulty: int | None = None, signed: SignedAuth | None = None):
        """Creates a mailbox; with `difficulty`, the nonce is a Create stamp (5.3)."""
        if signed is None:
            timestamp_ms = int(time.time() * 1000)
            nonce = None
            if difficulty is not None:
                nonce, _ = solve_create_nonce(key.public, timestamp_ms, os.urandom(8), difficulty)
            signed = sign_request(key, "Create", b"", [bytes([kind])], timestamp_ms, nonce)
        return self.mailbox.Create(
            self.pb.CreateRequest(recipient_key=key.public, kind=kind, auth=self.auth(signed)), timeout=10
        )

    def secure(self, key: Key, recipient_id: bytes, sender_key: bytes):
        signed = sign_request(key, "Secure", recipient_id, [sender_key])
        return self.mailbox.Secure(
            self.pb.SecureRequest(recipient_id=recipient_id, sender_key=sender_key, auth=self.auth(signed)),
            timeout=10,
        )

    def send(
        self,
        sender_id: bytes,
        envelope_id: bytes,
        ciphertext: bytes,
        ttl_seconds: int = 0,
        sender_key: Key | None = None,
        pow_stamp: int | None = None,
        pow_timestamp_ms: int = 0,
    ):
        request = self.pb.SendRequest(
            sender_id=sender_id, envelope_id=envelope_id, ttl_seconds=ttl_seconds, ciphertext=ciphertext
        )
        if sender_key is not None:
            request.sender_signature = sender_key.sign(send_payload(sender_id, envelope_id, ttl_seconds, ciphertext))
        if pow_stamp is not None:
            request.pow_stamp = pow_stamp
        request.pow_timestamp_ms = pow_timestamp_ms
        return self.mailbox.Send(request, timeout=10)

    def fetch_request(self, key: Key, recipient_id: bytes, limit: int = 0, signed: SignedAuth | None = None):
        signed = signed or sign_request(key, "Fetch", recipient_id, [u32be(limit)])
        return self.pb.FetchRequest(recipient_id=recipient_id, limit=limit, auth=self.auth(signed))

    def fetch(self, key: Key, recipient_id: bytes, limit: int = 0):
        return self.mailbox.Fetch(self.fetch_request(key, recipient_id, limit), timeout=10)

    def ack(self, key: Key, recipient_id: bytes, envelope_ids: list[bytes]):
        signed = sign_request(key, "Ack", recipient_id, list(envelope_ids))
        return self.mailbox.Ack(
            self.pb.AckRequest(recipient_id=recipient_id, envelope_ids=envelope_ids, auth=self.auth(signed)),
            timeout=10,
        )

    def delete(self, key: Key, recipient_id: bytes):
        signed = sign_request(key, "Delete", recipient_id, [])
        return self.mailbox.Delete(self.pb.DeleteRequest(recipient_id=recipient_id, auth=self.auth(signed)), timeout=10)

    def receive_first(self, key: Key, recipient_id: bytes, window: int, count: int):
        """Opens a Receive stream, reads `count` messages, then closes it."""
        signed = sign_request(key, "Receive", recipient_id, [u32be(window)])
        opening = self.pb.ReceiveRequest(
            open=self.pb.ReceiveOpen(recipient_id=recipient_id, window=window, auth=self.auth(signed))
        )
        import queue  # noqa: PLC0415

        outbound: queue.Queue = queue.Queue()
        outbound.put(opening)

        def requests():
            while True:
                item = outbound.get()
                if item is None:
                    return
                yield item

        stream = self.mailbox.Receive(requests(), timeout=10)
        received = []
        try:
            for message in stream:
                received.append(message)
                if len(received) == count:
                    break
        finally:
            outbound.put(None)
            stream.cancel()
        return received

    def prekey_count(self, device: Key, supporter_key: bytes, tamper: bool = False):
        """The device's prekey counts for `supporter_key` (section 6.1: the relay keeps
        prekeys per supporter and device; the key is outside the signature)."""
        from haven.v1 import keys_pb2  # noqa: PLC0415

        signed = sign_request(device, "PrekeyCount", device.public, [])
        if tamper:
            signed.signature = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
        return self.keys.PrekeyCount(
            keys_pb2.PrekeyCountRequest(
                device_key=device.public, auth=self.auth(signed), supporter_key=supporter_key
            ),
            timeout=10,
        )
