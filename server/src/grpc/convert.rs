//! Parsing generated types into the relay's domain types, with a clear message
//! for every malformed field, and back.

use haven_proto::v1 as proto;
use haven_store::{EnvelopeId, MailboxId, MailboxKind, PublicKey, SenderId, StoredEnvelope};

use crate::relay::{Auth, RelayError, SendInput};

fn fixed<const N: usize>(bytes: &[u8], field: &str) -> Result<[u8; N], RelayError> {
    bytes
        .try_into()
        .map_err(|_| RelayError::invalid(format!("{field} must be {N} bytes, got {}", bytes.len())))
}

/// Parses a recipient id.
pub fn mailbox_id(bytes: &[u8]) -> Result<MailboxId, RelayError> {
    fixed(bytes, "recipient_id").map(MailboxId::from_bytes)
}

/// Parses a sender id.
pub fn sender_id(bytes: &[u8]) -> Result<SenderId, RelayError> {
    fixed(bytes, "sender_id").map(SenderId::from_bytes)
}

/// Parses an envelope id.
pub fn envelope_id(bytes: &[u8]) -> Result<EnvelopeId, RelayError> {
    fixed(bytes, "envelope_id").map(EnvelopeId::from_bytes)
}

/// Parses a list of envelope ids.
pub fn envelope_ids(ids: &[Vec<u8>]) -> Result<Vec<EnvelopeId>, RelayError> {
    ids.iter().map(|id| envelope_id(id)).collect()
}

/// Parses a 32-byte public key field (its validity as a point is checked later).
pub fn public_key(bytes: &[u8], field: &str) -> Result<PublicKey, RelayError> {
    fixed(bytes, field).map(PublicKey::from_bytes)
}

/// Parses an optional `Auth`.
pub fn auth(auth: Option<proto::Auth>) -> Result<Option<Auth>, RelayError> {
    auth.map(|auth| {
        Ok(Auth {
            timestamp_ms: auth.timestamp_ms,
            nonce: fixed(&auth.nonce, "auth.nonce")?,
            signature: fixed(&auth.signature, "auth.signature")?,
        })
    })
    .transpose()
}

/// Parses a mailbox kind, refusing UNSPECIFIED and unknown numbers.
pub fn kind(value: i32) -> Result<MailboxKind, RelayError> {
    match proto::MailboxKind::try_from(value) {
        Ok(proto::MailboxKind::Private) => Ok(MailboxKind::Private),
        Ok(proto::MailboxKind::Intake) => Ok(MailboxKind::Intake),
        _ => Err(RelayError::invalid(format!(
            "kind must be MAILBOX_KIND_PRIVATE or MAILBOX_KIND_INTAKE, got {value}"
        ))),
    }
}

impl TryFrom<proto::SendRequest> for SendInput {
    type Error = RelayError;

    fn try_from(request: proto::SendRequest) -> Result<Self, RelayError> {
        Ok(Self {
            sender_id: sender_id(&request.sender_id)?,
            envelope_id: envelope_id(&request.envelope_id)?,
            ttl_seconds: request.ttl_seconds,
            ciphertext: request.ciphertext,
            sender_signature: Some(request.sender_signature).filter(|s| !s.is_empty()),
            pow_stamp: request.pow_stamp,
            pow_timestamp_ms: request.pow_timestamp_ms,
        })
    }
}

/// A stored envelope as delivered.
pub fn envelope(stored: StoredEnvelope) -> proto::Envelope {
    proto::Envelope {
        envelope_id: stored.id.as_bytes().to_vec(),
        ciphertext: stored.payload,
        expires_at: stored.expires_at,
    }
}
