//! Checks of recipient-signed requests: the timestamp window, the signature, and
//! replays inside the window.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

use haven_proto::auth::{Method, request_payload};
use haven_store::PublicKey;
use sha2::{Digest, Sha256};

use super::RelayError;

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

/// How the replay memory is bounded (`Limits` and the skews in the configuration).
#[derive(Clone, Copy, Debug)]
pub struct ReplayBounds {
    /// How far in the past a timestamp may be, ms.
    pub past_skew_ms: u64,
    /// How far in the future a timestamp may be, ms.
    pub future_skew_ms: u64,
    /// Most signatures remembered at once.
    pub capacity: usize,
    /// Most signatures remembered at once for one key.
    pub per_key: usize,
    /// Most signatures, stamps and claim nonces remembered at once for keys
    /// the store does not know yet ([`Pool::NewKey`]).
    pub new_key_capacity: usize,
}

/// Which of the two memories a request is remembered in (review M2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Signatures by keys the store knows (a mailbox's recipient key, a listed
    /// device, a supporter).
    Known,
    /// Requests whose key nobody knows yet: `Create` (a key made for it, and its
    /// stamp) and a device's first `PublishPrekeys`; and claim nonces, which
    /// are signed by no key at all. Anyone can make these for the price of a
    /// stamp, so they fill a memory of their own, and evictions there never
    /// raise the floor that established keys' requests face.
    NewKey,
}

/// A signature that verified, not yet remembered: [`Authenticator::remember`]
/// it once the request is known to concern something that exists.
#[must_use = "a verified request must be remembered, or it can be replayed"]
pub struct Verified {
    digest: [u8; 32],
    timestamp_ms: u64,
    key: [u8; 32],
}

impl Verified {
    /// SHA-256 of the signature: the same for the same request, unpredictable
    /// without it.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

/// Verifies signed requests and remembers signatures for the skew window.
///
/// The memory never refuses everyone. Each key may hold only `per_key` entries,
/// so one key flooding is refused alone; requests about keys the store does
/// not know are answered before anything is remembered where the caller can
/// tell (`Verified`); and when the memory is full, the entry with the oldest
/// timestamp is evicted instead of refusing the request (review F3).
///
/// Why eviction is safe: a replay is refused because its digest is remembered.
/// An evicted digest is no longer, so the relay raises a *floor*: it refuses
/// every timestamp at or below the newest timestamp it ever evicted. Eviction
/// takes the oldest timestamp first, so every evicted digest has a timestamp
/// at or below the floor, and a replay of it is refused by the floor instead
/// of by the memory. Honest requests carry the current time and stay above
/// the floor unless an attacker evicts faster than the window passes (the
/// window then shrinks to what the memory holds: with a million entries and
/// the few thousand verifications per second a core manages, it stays minutes
/// wide). The floor only rises, and matters only while it is inside the window.
pub struct Authenticator {
    bounds: ReplayBounds,
    // std Mutex: map and set updates under it, never held across an await.
    seen: Mutex<Seen>,
    // std Mutex, as above: the memory of [`Pool::NewKey`].
    new_keys: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Digest of a signature -> its timestamp and the key it counts against.
    digests: HashMap<[u8; 32], ([u8; 32], u64)>,
    /// The same digests by timestamp, oldest first: expiry and eviction both
    /// take from the front.
    by_time: BTreeSet<(u64, [u8; 32])>,
    /// Entries per key (absent at 0).
    per_key: HashMap<[u8; 32], usize>,
    /// Timestamps at or below this are refused: the newest evicted one.
    floor_ms: u64,
}

impl Seen {
    fn forget(&mut self, timestamp_ms: u64, digest: [u8; 32]) {
        self.by_time.remove(&(timestamp_ms, digest));
        let Some((key, _)) = self.digests.remove(&digest) else {
            return;
        };
        if let Some(count) = self.per_key.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_key.remove(&key);
            }
        }
    }
}

/// The budget key of requests that are not signed by a key (claims: they are
/// paid for with a stamp, and a budget per supporter would let anyone block a
/// supporter's claims).
const UNKEYED: [u8; 32] = [0; 32];

impl Authenticator {
    /// An authenticator with these bounds.
    pub fn new(bounds: ReplayBounds) -> Self {
        Self {
            bounds,
            seen: Mutex::new(Seen::default()),
            new_keys: Mutex::new(Seen::default()),
        }
    }

    /// Accepts the request if `auth` is a fresh, valid signature by `key` over
    /// the canonical payload of `method` on `recipient_id` with `fields`, and
    /// remembers it. Use [`Self::verify`] and [`Self::remember`] instead where
    /// the store can say in between whether the key is known.
    pub fn check(
        &self,
        method: Method,
        recipient_id: &[u8],
        key: &PublicKey,
        auth: Option<Auth>,
        fields: &[&[u8]],
        now_ms: u64,
    ) -> Result<(), RelayError> {
        let verified = self.verify(method, recipient_id, key, auth, fields, now_ms)?;
        self.remember(verified, now_ms)
    }

    /// Checks the window and the signature, remembering nothing.
    pub fn verify(
        &self,
        method: Method,
        recipient_id: &[u8],
        key: &PublicKey,
        auth: Option<Auth>,
        fields: &[&[u8]],
        now_ms: u64,
    ) -> Result<Verified, RelayError> {
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
        Ok(Verified {
            digest: Sha256::digest(auth.signature).into(),
            timestamp_ms: auth.timestamp_ms,
            key: *key.as_bytes(),
        })
    }

    /// Whether the signature `verified` carries is remembered in `pool`: the
    /// very same request was accepted before, within the window. Only calls
    /// that answer a repeat with the first answer may use this (`Create`,
    /// review F18); everything else refuses it through [`Self::remember`].
    pub fn is_remembered(&self, pool: Pool, verified: &Verified) -> bool {
        let memory = match pool {
            Pool::Known => &self.seen,
            Pool::NewKey => &self.new_keys,
        };
        memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .digests
            .contains_key(&verified.digest)
    }

    /// Remembers a verified signature by a known key; refuses it if it was
    /// used before.
    pub fn remember(&self, verified: Verified, now_ms: u64) -> Result<(), RelayError> {
        self.remember_in(Pool::Known, verified, now_ms)
    }

    /// Remembers a verified signature in `pool`; refuses it if it was used before.
    pub fn remember_in(
        &self,
        pool: Pool,
        verified: Verified,
        now_ms: u64,
    ) -> Result<(), RelayError> {
        self.remember_as(
            pool,
            verified.digest,
            verified.key,
            verified.timestamp_ms,
            now_ms,
            "auth signature",
        )
    }

    /// Refuses a timestamp further in the past than the skew window, or more
    /// than the small future skew ahead of the relay clock.
    pub fn check_window(&self, timestamp_ms: u64, now_ms: u64) -> Result<(), RelayError> {
        let ReplayBounds {
            past_skew_ms,
            future_skew_ms,
            ..
        } = self.bounds;
        if timestamp_ms > now_ms.saturating_add(future_skew_ms) {
            return Err(RelayError::Unauthenticated(format!(
                "timestamp is {} ms ahead of the relay clock; at most {future_skew_ms} ms is \
                 accepted (check the device clock)",
                timestamp_ms - now_ms
            )));
        }
        if timestamp_ms.saturating_add(past_skew_ms) < now_ms {
            return Err(RelayError::Unauthenticated(format!(
                "timestamp is {} s behind the relay clock; at most {} s is accepted \
                 (check the device clock)",
                (now_ms - timestamp_ms) / 1000,
                past_skew_ms / 1000
            )));
        }
        Ok(())
    }

    /// Remembers `digest` of an unsigned request (a claim nonce) until
    /// `timestamp_ms` leaves the window; refuses it if it was already remembered
    /// (a replay of `what`). The caller checked the window.
    pub fn remember_once(
        &self,
        pool: Pool,
        digest: [u8; 32],
        timestamp_ms: u64,
        now_ms: u64,
        what: &str,
    ) -> Result<(), RelayError> {
        self.remember_as(pool, digest, UNKEYED, timestamp_ms, now_ms, what)
    }

    fn remember_as(
        &self,
        pool: Pool,
        digest: [u8; 32],
        key: [u8; 32],
        timestamp_ms: u64,
        now_ms: u64,
        what: &str,
    ) -> Result<(), RelayError> {
        let bounds = self.bounds;
        let (memory, capacity) = match pool {
            Pool::Known => (&self.seen, bounds.capacity),
            Pool::NewKey => (&self.new_keys, bounds.new_key_capacity),
        };
        let mut seen = memory.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget what can no longer pass the window.
        while let Some(&(oldest, old)) = seen.by_time.first() {
            if oldest.saturating_add(bounds.past_skew_ms) >= now_ms {
                break;
            }
            seen.forget(oldest, old);
        }
        if timestamp_ms <= seen.floor_ms {
            return Err(RelayError::Unauthenticated(
                "timestamp is older than the relay's replay memory reaches right now; sign the \
                 request again with the current time"
                    .into(),
            ));
        }
        if seen.digests.contains_key(&digest) {
            return Err(RelayError::Unauthenticated(format!(
                "{what} was already used; make every request anew"
            )));
        }
        if key != UNKEYED && seen.per_key.get(&key).copied().unwrap_or(0) >= bounds.per_key {
            return Err(RelayError::ResourceExhausted(
                "too many signed requests with this key in the replay window; slow down and \
                 retry shortly"
                    .into(),
            ));
        }
        if seen.digests.len() >= capacity.max(1) {
            let oldest = seen.by_time.first().copied();
            match oldest {
                // The request is older than everything remembered: accept it and
                // raise the floor to it instead of keeping it.
                Some((oldest_ms, _)) if timestamp_ms <= oldest_ms => {
                    seen.floor_ms = timestamp_ms;
                    return Ok(());
                }
                Some((oldest_ms, old)) => {
                    seen.forget(oldest_ms, old);
                    seen.floor_ms = seen.floor_ms.max(oldest_ms);
                }
                None => {}
            }
        }
        seen.digests.insert(digest, (key, timestamp_ms));
        seen.by_time.insert((timestamp_ms, digest));
        *seen.per_key.entry(key).or_default() += 1;
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

    fn bounds(capacity: usize, per_key: usize) -> ReplayBounds {
        ReplayBounds {
            past_skew_ms: 60_000,
            future_skew_ms: 5_000,
            capacity,
            per_key,
            new_key_capacity: 2,
        }
    }

    #[test]
    fn fresh_valid_signature_passes_once() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let public = PublicKey::from_bytes(key.verifying_key().to_bytes());
        let authenticator = Authenticator::new(bounds(1000, 1000));
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
            matches!(check(auth, 1_070_000), Err(RelayError::Unauthenticated(m)) if m.contains("behind"))
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

    #[test]
    fn the_future_skew_is_small_and_the_past_skew_stays() {
        let authenticator = Authenticator::new(bounds(1000, 1000));
        let now = 10_000_000;
        assert!(authenticator.check_window(now + 5_000, now).is_ok());
        assert!(
            matches!(authenticator.check_window(now + 5_001, now), Err(RelayError::Unauthenticated(m)) if m.contains("ahead"))
        );
        assert!(authenticator.check_window(now - 60_000, now).is_ok());
        assert!(authenticator.check_window(now - 60_001, now).is_err());
    }

    #[test]
    fn a_full_memory_evicts_the_oldest_and_refuses_its_replay_by_the_floor() {
        let authenticator = Authenticator::new(bounds(2, 1000));
        let now = 10_000_000;
        let remember = |digest: u8, key: u8, ts: u64| {
            authenticator.remember_as(Pool::Known, [digest; 32], [key; 32], ts, now, "request")
        };
        assert!(remember(1, 1, now - 3).is_ok());
        assert!(remember(2, 2, now - 2).is_ok());
        // Full: the oldest (1) is evicted, and the floor rises to its timestamp.
        assert!(remember(3, 3, now - 1).is_ok());
        assert!(
            matches!(remember(1, 1, now - 3), Err(RelayError::Unauthenticated(m)) if m.contains("older than"))
        );
        // Remembered replays are refused as before; fresh requests pass.
        assert!(
            matches!(remember(3, 3, now - 1), Err(RelayError::Unauthenticated(m)) if m.contains("already used"))
        );
        assert!(remember(4, 4, now).is_ok());
        // A request older than everything remembered is accepted once, by the floor.
        let authenticator = Authenticator::new(bounds(1, 1000));
        assert!(
            authenticator
                .remember_as(Pool::Known, [5; 32], [5; 32], now, now, "r")
                .is_ok()
        );
        assert!(
            authenticator
                .remember_as(Pool::Known, [6; 32], [6; 32], now - 10, now, "r")
                .is_ok()
        );
        assert!(
            authenticator
                .remember_as(Pool::Known, [6; 32], [6; 32], now - 10, now, "r")
                .is_err()
        );
    }

    #[test]
    fn one_key_over_its_budget_is_refused_alone() {
        let authenticator = Authenticator::new(bounds(1000, 2));
        let now = 10_000_000;
        assert!(
            authenticator
                .remember_as(Pool::Known, [1; 32], [9; 32], now, now, "r")
                .is_ok()
        );
        assert!(
            authenticator
                .remember_as(Pool::Known, [2; 32], [9; 32], now, now, "r")
                .is_ok()
        );
        assert!(matches!(
            authenticator.remember_as(Pool::Known, [3; 32], [9; 32], now, now, "r"),
            Err(RelayError::ResourceExhausted(_))
        ));
        assert!(
            authenticator
                .remember_as(Pool::Known, [4; 32], [8; 32], now, now, "r")
                .is_ok()
        );
        // Claims count against no key.
        for digest in 10..20 {
            assert!(
                authenticator
                    .remember_once(Pool::Known, [digest; 32], now, now, "claim")
                    .is_ok()
            );
        }
    }

    #[test]
    fn new_keys_flooding_their_memory_never_raise_the_floor_of_known_keys() {
        let authenticator = Authenticator::new(bounds(2, 1000));
        let now = 10_000_000;
        // A known key's request from a clock 100 s behind.
        let lagging = now - 100_000;
        // Creates under fresh keys: far more than either memory holds.
        // (Its own floor rises: new keys with lagging clocks are refused
        // during such a flood, established ones are not.)
        for n in 0..50u8 {
            let _ = authenticator.remember_as(Pool::NewKey, [n; 32], [n; 32], now, now, "r");
        }
        assert!(
            authenticator
                .remember_as(Pool::Known, [200; 32], [200; 32], lagging, now, "r")
                .is_ok()
        );
        // The same flood in the known keys' memory pushes the lagging clock out.
        for n in 0..50u8 {
            let _ = authenticator.remember_as(Pool::Known, [n; 32], [n; 32], now, now, "r");
        }
        assert!(
            authenticator
                .remember_as(Pool::Known, [201; 32], [201; 32], lagging, now, "r")
                .is_err()
        );
    }
}
