//! Rate limits on `ClaimBundles` (review F7): token buckets per supporter, per
//! source address and per connection, in memory, as plain functions of `now`.
//!
//! A claim takes one unit of a supporter's capacity and one-time prekeys from
//! each of its devices, and a stamp alone cost about 10 ms of CPU, so anyone
//! could drain a supporter in seconds. Supporter keys are public; the
//! per-address map is keyed by the connection's per-boot salted address hash
//! (`grpc::address`), never an address. Both are bounded: past their size the
//! key touched longest ago is forgotten, which only gives it a fresh burst.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use std::hash::Hash;

use haven_store::SupporterKey;

/// A token bucket: `burst` tokens, refilled at `per_minute` a minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per minute.
    pub per_minute: u32,
    /// Most tokens held (and the first claims allowed at once).
    pub burst: u32,
}

/// One token in a bucket's units: a minute in milliseconds, so that a refill
/// of `per_minute` tokens a minute is exactly `per_minute` units a millisecond
/// (no rounding, no floating point).
const TOKEN: u64 = 60_000;

/// One bucket's state.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    units: u64,
    updated_ms: u64,
}

impl Bucket {
    /// A full bucket at `now_ms`.
    pub fn full(rate: Rate, now_ms: u64) -> Self {
        Self {
            units: u64::from(rate.burst) * TOKEN,
            updated_ms: now_ms,
        }
    }

    /// Takes one token if there is one, after refilling for the time since the
    /// last call. A clock going backwards refills nothing.
    pub fn take(&mut self, rate: Rate, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.updated_ms);
        let refill = elapsed.saturating_mul(u64::from(rate.per_minute));
        self.units = self
            .units
            .saturating_add(refill)
            .min(u64::from(rate.burst) * TOKEN);
        self.updated_ms = self.updated_ms.max(now_ms);
        if self.units >= TOKEN {
            self.units -= TOKEN;
            true
        } else {
            false
        }
    }
}

/// Buckets per key (a supporter key, a salted address hash), bounded.
pub struct Claims<K> {
    rate: Rate,
    max_keys: usize,
    /// std Mutex: held for a map lookup, never across an await.
    state: Mutex<State<K>>,
}

/// The per-supporter buckets.
pub type SupporterClaims = Claims<SupporterKey>;

struct State<K> {
    /// Each key's bucket and its place in `order`.
    buckets: HashMap<K, (Bucket, u64)>,
    /// Keys by last touch, oldest first, for eviction.
    order: BTreeMap<u64, K>,
    /// The next touch's place in `order`.
    next: u64,
}

impl<K: Copy + Eq + Hash> Claims<K> {
    /// Buckets at `rate`, for at most `max_keys` keys at once.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            state: Mutex::new(State {
                buckets: HashMap::new(),
                order: BTreeMap::new(),
                next: 0,
            }),
        }
    }

    /// Whether a claim for `supporter` (or from this address) may go ahead
    /// now (and takes its token).
    pub fn allow(&self, supporter: &K, now_ms: u64) -> bool {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = &mut *state;
        let place = state.next;
        state.next += 1;
        let (bucket, allowed) = match state.buckets.remove(supporter) {
            Some((mut bucket, old_place)) => {
                state.order.remove(&old_place);
                let allowed = bucket.take(self.rate, now_ms);
                (bucket, allowed)
            }
            None => {
                let mut bucket = Bucket::full(self.rate, now_ms);
                let allowed = bucket.take(self.rate, now_ms);
                (bucket, allowed)
            }
        };
        while state.buckets.len() >= self.max_keys {
            let Some((_, oldest)) = state.order.pop_first() else {
                break;
            };
            state.buckets.remove(&oldest);
        }
        state.buckets.insert(*supporter, (bucket, place));
        state.order.insert(place, *supporter);
        allowed
    }

    /// How many supporters are tracked (for tests).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .buckets
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_minute: 10,
        burst: 5,
    };

    fn key(n: u8) -> SupporterKey {
        SupporterKey::from_bytes([n; 32])
    }

    #[test]
    fn a_burst_then_one_claim_every_six_seconds() {
        let claims = SupporterClaims::new(RATE, 10);
        let now = 1_000_000;
        assert!((0..5).all(|_| claims.allow(&key(1), now)));
        assert!(!claims.allow(&key(1), now));
        assert!(
            claims.allow(&key(2), now),
            "another supporter is not affected"
        );
        assert!(!claims.allow(&key(1), now + 5_999));
        assert!(claims.allow(&key(1), now + 6_000));
        assert!(!claims.allow(&key(1), now + 6_001));
        // A long pause refills only up to the burst.
        let later = now + 3_600_000;
        assert!((0..5).all(|_| claims.allow(&key(1), later)));
        assert!(!claims.allow(&key(1), later));
    }

    #[test]
    fn the_map_is_bounded_and_forgets_the_supporter_touched_longest_ago() {
        let claims = SupporterClaims::new(RATE, 3);
        let now = 1_000_000;
        for _ in 0..5 {
            claims.allow(&key(1), now);
        }
        assert!(!claims.allow(&key(1), now));
        for n in 2..=4 {
            claims.allow(&key(n), now);
        }
        assert_eq!(claims.tracked(), 3);
        // Supporter 1 was evicted: it starts again with a full burst.
        assert!(claims.allow(&key(1), now));
        assert_eq!(claims.tracked(), 3);
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let mut bucket = Bucket::full(RATE, 1_000_000);
        for _ in 0..5 {
            assert!(bucket.take(RATE, 1_000_000));
        }
        assert!(!bucket.take(RATE, 0));
        assert!(!bucket.take(RATE, 1_000_000));
    }
}
