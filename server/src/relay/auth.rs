//! Checks of recipient-signed requests: the timestamp window, the signature, and
//! replays inside the window.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use haven_proto::auth::{Method, request_payload};
use haven_store::PublicKey;
use sha2::{Digest, Sha256};

use super::RelayError;

/// Most signatures remembered at once. An authenticated request costs the
/// client a signature with a mailbox key, so reaching this takes a flood that
/// the connection limits slow down; past it, requests are refused as busy
/// rather than letting a replay through.
const MAX_REMEMBERED: usize = 1_000_000;

/// A request's authentication as parsed from the wire.
#[derive(Clone, Copy)]
pub struct Auth {
    /// Client clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Random, so that identical requests sign differently.
    pub nonce: [u8; 16],
    /// Ed25519 signature over the canonical payload.
    pub signature: [u8; 64],
}

/// Verifies signed requests and remembers signatures for the skew window.
pub struct Authenticator {
    skew_ms: u64,
    // std Mutex: a hash-map insert under it, never held across an await.
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Digest of a signature -> when it may be forgotten (relay clock, ms).
    digests: HashMap<[u8; 32], u64>,
    /// The same digests in the order they expire.
    order: VecDeque<(u64, [u8; 32])>,
}

impl Authenticator {
    /// An authenticator accepting timestamps up to `skew_ms` from the relay clock.
    pub fn new(skew_ms: u64) -> Self {
        Self {
            skew_ms,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Accepts the request if `auth` is a fresh, valid signature by `key` over
    /// the canonical payload of `method` on `recipient_id` with `fields`.
    pub fn check(
        &self,
        method: Method,
        recipient_id: &[u8],
        key: &PublicKey,
        auth: Option<Auth>,
        fields: &[&[u8]],
        now_ms: u64,
    ) -> Result<(), RelayError> {
        let auth = auth.ok_or_else(|| {
            RelayError::Unauthenticated(
                "request must carry an auth signature by the mailbox's recipient key".into(),
            )
        })?;
        self.check_window(auth.timestamp_ms, now_ms)?;
        let payload = request_payload(method, recipient_id, auth.timestamp_ms, &auth.nonce, fields);
        haven_proto::auth::verify(key.as_bytes(), &payload, &auth.signature).map_err(|error| {
            RelayError::Unauthenticated(format!("auth signature refused: {error}"))
        })?;
        self.remember_once(
            Sha256::digest(auth.signature).into(),
            auth.timestamp_ms,
            now_ms,
            "auth signature",
        )
    }

    /// Refuses a timestamp further than the skew window from the relay clock.
    pub fn check_window(&self, timestamp_ms: u64, now_ms: u64) -> Result<(), RelayError> {
        let distance = now_ms.abs_diff(timestamp_ms);
        if distance > self.skew_ms {
            return Err(RelayError::Unauthenticated(format!(
                "timestamp is {} s away from the relay clock; at most {} s is accepted \
                 (check the device clock)",
                distance / 1000,
                self.skew_ms / 1000
            )));
        }
        Ok(())
    }

    /// Remembers `digest` until `timestamp_ms` leaves the window; refuses it if it
    /// was already remembered (a replay of `what`). The caller checked the window.
    pub fn remember_once(
        &self,
        digest: [u8; 32],
        timestamp_ms: u64,
        now_ms: u64,
        what: &str,
    ) -> Result<(), RelayError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(&(forget_at, old)) = seen.order.front() {
            if forget_at > now_ms {
                break;
            }
            seen.order.pop_front();
            seen.digests.remove(&old);
        }
        if seen.digests.contains_key(&digest) {
            return Err(RelayError::Unauthenticated(format!(
                "{what} was already used; make every request anew"
            )));
        }
        if seen.digests.len() >= MAX_REMEMBERED {
            return Err(RelayError::ResourceExhausted(
                "relay is busy; retry shortly".into(),
            ));
        }
        // A timestamp is accepted until now + skew at the latest; remembering the
        // digest until its timestamp + skew covers the whole time it is valid.
        let forget_at = timestamp_ms.saturating_add(self.skew_ms).saturating_add(1);
        seen.digests.insert(digest, forget_at);
        // Entries stay ordered enough: a later insert can expire earlier by at most
        // 2 * skew, so it is only forgotten that much late; never early.
        let last = seen.order.back().map_or(0, |newest| newest.0);
        seen.order.push_back((forget_at.max(last), digest));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(key: &SigningKey, method: Method, id: &[u8], ts: u64, fields: &[&[u8]]) -> Auth {
        // A fixed nonce: these tests are about the window and the replay memory.
        let payload = request_payload(method, id, ts, &[3; 16], fields);
        Auth {
            timestamp_ms: ts,
            nonce: [3; 16],
            signature: key.sign(&payload).to_bytes(),
        }
    }

    #[test]
    fn fresh_valid_signature_passes_once() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let public = PublicKey::from_bytes(key.verifying_key().to_bytes());
        let authenticator = Authenticator::new(60_000);
        let auth = signed(&key, Method::Fetch, &[1; 16], 1_000_000, &[b"x"]);
        let check = |auth, now| {
            authenticator.check(Method::Fetch, &[1; 16], &public, Some(auth), &[b"x"], now)
        };
        assert!(check(auth, 1_000_500).is_ok());
        assert!(
            matches!(check(auth, 1_000_600), Err(RelayError::Unauthenticated(m)) if m.contains("already used"))
        );
        // After the window the timestamp itself is stale.
        assert!(
            matches!(check(auth, 1_070_000), Err(RelayError::Unauthenticated(m)) if m.contains("away from"))
        );
        let future = signed(&key, Method::Fetch, &[1; 16], 2_000_000, &[b"x"]);
        assert!(check(future, 1_000_000).is_err());
        let other_method = signed(&key, Method::Delete, &[1; 16], 1_000_000, &[b"x"]);
        assert!(
            matches!(check(other_method, 1_000_000), Err(RelayError::Unauthenticated(m)) if m.contains("refused"))
        );
        assert!(
            authenticator
                .check(Method::Fetch, &[1; 16], &public, None, &[], 0)
                .is_err()
        );
    }
}
