//! Canonical payloads signed by a mailbox's recipient key and by a secured
//! mailbox's sender key.
//!
//! Every payload starts with a domain string that names its purpose and version,
//! so a signature made for one purpose can never be accepted for another. Fields
//! are length-prefixed, so no two field lists encode to the same bytes.

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// Domain separator of recipient-authenticated requests.
const REQUEST_DOMAIN: &[u8] = b"haven.v1.request-auth";
/// Domain separator of sender signatures on a secured mailbox.
const SEND_DOMAIN: &[u8] = b"haven.v1.send-auth";

/// The recipient-authenticated operations. The name is part of the signed
/// payload, so a signature for `Fetch` cannot authorize a `Delete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Method {
    /// `Mailbox/Create` (proof of possession of the new recipient key).
    Create,
    /// `Mailbox/Secure`.
    Secure,
    /// `Mailbox/Receive`'s opening message.
    Receive,
    /// `Mailbox/Fetch`.
    Fetch,
    /// `Mailbox/Ack`.
    Ack,
    /// `Mailbox/Delete`.
    Delete,
    /// `Mailbox/RegisterPush`.
    RegisterPush,
    /// `Keys/PublishPrekeys` (signed by the device key).
    PublishPrekeys,
    /// `Keys/PrekeyCount` (signed by the device key).
    PrekeyCount,
    /// `Keys/SetCapacity` (signed by the supporter key).
    SetCapacity,
}

impl Method {
    /// The gRPC method name, as signed.
    pub fn name(self) -> &'static str {
        match self {
            Method::Create => "Create",
            Method::Secure => "Secure",
            Method::Receive => "Receive",
            Method::Fetch => "Fetch",
            Method::Ack => "Ack",
            Method::Delete => "Delete",
            Method::RegisterPush => "RegisterPush",
            Method::PublishPrekeys => "PublishPrekeys",
            Method::PrekeyCount => "PrekeyCount",
            Method::SetCapacity => "SetCapacity",
        }
    }
}

/// Why a signature was refused. Carries no key or signature bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The public key is not 32 bytes or not a valid Ed25519 point.
    #[error("public key is not a valid 32-byte Ed25519 key")]
    BadKey,
    /// The signature is not 64 bytes.
    #[error("signature must be 64 bytes, got {0}")]
    BadLength(usize),
    /// The signature does not verify.
    #[error("signature does not verify")]
    Invalid,
}

/// Length of the random nonce in every signed request.
pub const NONCE_LEN: usize = 16;

/// The bytes a key holder signs for `method` on `recipient_id` (a mailbox's
/// recipient id, or for the `Keys` methods the device or supporter key) at
/// `timestamp_ms`, with a fresh random `nonce` and the method's own `fields`
/// (documented per field in the `.proto`: e.g. `Fetch` signs its limit as 4 bytes
/// big-endian). The nonce makes two identical requests in the same millisecond
/// sign differently (Ed25519 is deterministic), so the relay's replay check never
/// refuses a legitimate repeat.
pub fn request_payload(
    method: Method,
    recipient_id: &[u8],
    timestamp_ms: u64,
    nonce: &[u8; NONCE_LEN],
    fields: &[&[u8]],
) -> Vec<u8> {
    let field_bytes: usize = fields.iter().map(|f| f.len() + 4).sum();
    let mut out = Vec::with_capacity(REQUEST_DOMAIN.len() + 64 + field_bytes);
    put_field(&mut out, REQUEST_DOMAIN);
    put_field(&mut out, method.name().as_bytes());
    put_field(&mut out, recipient_id);
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&u32_len(fields.len()).to_be_bytes());
    for field in fields {
        put_field(&mut out, field);
    }
    out
}

/// The bytes a secured mailbox's sender signs for one `Send`. The ciphertext
/// enters as its SHA-256 digest. There is no timestamp: a replayed send carries
/// the same envelope id and is stored once.
pub fn send_payload(
    sender_id: &[u8],
    envelope_id: &[u8],
    ttl_seconds: u64,
    ciphertext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEND_DOMAIN.len() + 96);
    put_field(&mut out, SEND_DOMAIN);
    put_field(&mut out, sender_id);
    put_field(&mut out, envelope_id);
    out.extend_from_slice(&ttl_seconds.to_be_bytes());
    out.extend_from_slice(&Sha256::digest(ciphertext));
    out
}

/// A signed `Auth` for `method` on `recipient_id` with `fields`, by `key`, at
/// `timestamp_ms` with `nonce` (both chosen by the caller: this crate reads no
/// clock and no randomness). The one way clients build request authentication.
pub fn sign_request(
    key: &ed25519_dalek::SigningKey,
    method: Method,
    recipient_id: &[u8],
    fields: &[&[u8]],
    timestamp_ms: u64,
    nonce: [u8; NONCE_LEN],
) -> crate::v1::Auth {
    use ed25519_dalek::Signer as _;
    let payload = request_payload(method, recipient_id, timestamp_ms, &nonce, fields);
    crate::v1::Auth {
        timestamp_ms,
        nonce: nonce.to_vec(),
        signature: key.sign(&payload).to_bytes().to_vec(),
    }
}

/// Parses an Ed25519 public key, refusing malformed and weak (small-order) keys.
pub fn public_key(public_key: &[u8]) -> Result<VerifyingKey, SignatureError> {
    let key_bytes: [u8; 32] = public_key.try_into().map_err(|_| SignatureError::BadKey)?;
    let key = VerifyingKey::from_bytes(&key_bytes).map_err(|_| SignatureError::BadKey)?;
    if key.is_weak() {
        return Err(SignatureError::BadKey);
    }
    Ok(key)
}

/// Verifies an Ed25519 signature strictly (no malleable or small-order keys), the
/// one check both the relay and tests use.
pub fn verify(public_key: &[u8], payload: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
    let key = self::public_key(public_key)?;
    let signature_bytes: [u8; 64] = signature
        .try_into()
        .map_err(|_| SignatureError::BadLength(signature.len()))?;
    let signature = Signature::from_bytes(&signature_bytes);
    key.verify_strict(payload, &signature)
        .map_err(|_| SignatureError::Invalid)
}

fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&u32_len(field.len()).to_be_bytes());
    out.extend_from_slice(field);
}

/// Lengths on the wire are bounded far below 4 GiB by the relay's message limit;
/// saturating keeps the encoding total without a panic path.
fn u32_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42u8; 32])
    }

    #[test]
    fn payload_is_pinned() {
        // A silent change of the canonical encoding would break every deployed client.
        let payload = request_payload(
            Method::Fetch,
            &[1u8; 16],
            1_700_000_000_000,
            &[9u8; 16],
            &[&7u32.to_be_bytes()],
        );
        assert_eq!(
            hex::encode(Sha256::digest(&payload)),
            hex::encode(Sha256::digest(
                [
                    &21u32.to_be_bytes()[..],
                    REQUEST_DOMAIN,
                    &5u32.to_be_bytes(),
                    b"Fetch",
                    &16u32.to_be_bytes(),
                    &[1u8; 16],
                    &1_700_000_000_000u64.to_be_bytes(),
                    &[9u8; 16],
                    &1u32.to_be_bytes(),
                    &4u32.to_be_bytes(),
                    &7u32.to_be_bytes(),
                ]
                .concat()
            ))
        );
    }

    #[test]
    fn method_and_fields_are_bound() {
        let signing_key = key();
        let payload = request_payload(Method::Fetch, &[1u8; 16], 5, &[0; 16], &[b"a"]);
        let signature = signing_key.sign(&payload).to_bytes();
        let public = signing_key.verifying_key().to_bytes();
        assert_eq!(verify(&public, &payload, &signature), Ok(()));
        for other in [
            request_payload(Method::Delete, &[1u8; 16], 5, &[0; 16], &[b"a"]),
            request_payload(Method::Fetch, &[2u8; 16], 5, &[0; 16], &[b"a"]),
            request_payload(Method::Fetch, &[1u8; 16], 6, &[0; 16], &[b"a"]),
            request_payload(Method::Fetch, &[1u8; 16], 5, &[0; 16], &[b"b"]),
            request_payload(Method::Fetch, &[1u8; 16], 5, &[0; 16], &[b"a", b""]),
            request_payload(Method::Fetch, &[1u8; 16], 5, &[1; 16], &[b"a"]),
        ] {
            assert_eq!(
                verify(&public, &other, &signature),
                Err(SignatureError::Invalid)
            );
        }
    }

    #[test]
    fn malformed_keys_and_signatures_are_errors() {
        let payload = send_payload(&[1; 16], &[2; 16], 60, b"x");
        assert_eq!(
            verify(&[0u8; 31], &payload, &[0u8; 64]),
            Err(SignatureError::BadKey)
        );
        let public = key().verifying_key().to_bytes();
        assert_eq!(
            verify(&public, &payload, &[0u8; 63]),
            Err(SignatureError::BadLength(63))
        );
        assert_eq!(
            verify(&public, &payload, &[0u8; 64]),
            Err(SignatureError::Invalid)
        );
        // The identity point is a weak key: every signature would "verify" under it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(
            verify(&identity, &payload, &[0u8; 64]),
            Err(SignatureError::BadKey)
        );
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(key in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
                               sig in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
                               msg in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = verify(&key, &msg, &sig);
        }
    }
}
