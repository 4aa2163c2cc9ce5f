//! Response bytes held in memory, bounded (review H4). A `Fetch` response, or
//! an envelope queued on a `Receive` stream, stays in the relay's memory until
//! the client's HTTP/2 window lets it out; a client that never opens its
//! window used to keep about 1 MiB per unread Fetch, 256 calls per connection.
//! Now such bytes count, in KiB, until the response is dropped (Fetch) or
//! handed to the transport (a streamed envelope), against:
//! - the whole relay's budget, `max_response_bytes`;
//! - a share of it per source network (fresh review H-D): an IPv4 address, or
//!   an IPv6 /48 (second fresh review F4: per /64, one /48 had 65 536
//!   shares), counted under a per-boot salted hash (`address`), in memory
//!   only and only while the network holds something: 256 connections of
//!   8 MiB each let one address hold every byte of the relay's budget, so
//!   that every other Fetch was refused and every stream stopped delivering;
//! - for Fetch responses, the relay's budget less a reserve only streams use
//!   (fresh review H-D), so that Fetches from many addresses cannot stop
//!   streams delivering;
//! - for Fetch responses, their connection's budget.
//!
//! A Fetch takes its share of the relay's budget for the largest page there
//! can be before it reads anything from the store, and gives back what its
//! page did not use once read (fresh review M-A: pages used to be read and
//! decrypted first, so concurrent Fetches held any number of pages while they
//! waited for the budget that was to bound them). A connection whose
//! responses stop moving is closed after the stall timeout (`incoming`),
//! which gives all of its bytes back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::address::AddressKey;
use super::incoming::ConnectionState;
use crate::relay::RelayError;

/// Bytes a response holds against the budgets; given back on drop. Cloneable
/// only so that it can ride in a response's extensions to the edge layer.
#[derive(Clone)]
pub struct HeldBytes {
    _permits: Arc<Permits>,
}

struct Permits {
    _relay: OwnedSemaphorePermit,
    _fetches: Option<OwnedSemaphorePermit>,
    _address: Option<AddressPermit>,
    _connection: Option<OwnedSemaphorePermit>,
}

/// What a Fetch takes before it reads its page: the largest page's worth of
/// the relay's budget, the Fetch part of it and its address's share. See
/// [`Reserved::settle`].
pub struct Reserved {
    relay: OwnedSemaphorePermit,
    fetches: OwnedSemaphorePermit,
    address: Option<AddressPermit>,
}

/// The budgets of response bytes held in memory; see the module docs.
#[derive(Clone)]
pub struct ResponseBudget {
    /// KiB of response bytes relay-wide; a permit per KiB.
    relay: Arc<Semaphore>,
    /// KiB the Fetch responses may hold among them: `relay`'s less the
    /// reserve for streams. A Fetch takes both.
    fetches: Arc<Semaphore>,
    /// Each source address's share.
    per_address: AddressShares,
    /// How long a Fetch waits for the relay-wide budget before it is refused.
    wait: Duration,
}

/// KiB, rounded up, that `bytes` count as.
pub fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl ResponseBudget {
    /// A budget of `kib` KiB for the whole relay, all of it open to Fetches
    /// and no share per address until [`Self::with_shares`]; a Fetch waits
    /// `wait` for it.
    pub fn new(kib: usize, wait: Duration) -> Self {
        Self {
            relay: Arc::new(Semaphore::new(kib)),
            fetches: Arc::new(Semaphore::new(kib)),
            per_address: AddressShares::new(0),
            wait,
        }
    }

    /// The same relay-wide budget, of which Fetch responses may hold
    /// `fetches_kib` among them (the rest is kept for streams) and one
    /// source address `per_address_kib` (0: no share kept). Made before the
    /// budget is first cloned or used.
    pub fn with_shares(self, fetches_kib: usize, per_address_kib: usize) -> Self {
        let relay_kib = self.relay.available_permits();
        Self {
            fetches: Arc::new(Semaphore::new(fetches_kib.min(relay_kib))),
            per_address: AddressShares::new(per_address_kib),
            ..self
        }
    }

    /// Takes `largest`, the most one page can hold, for one Fetch before it
    /// reads its page: from the address's share at once (an address that
    /// leaves its responses unread is refused, not waited for), then from
    /// the Fetch part of the relay's budget and the relay's, waiting a little
    /// while other responses drain or stalled connections are closed.
    pub async fn for_fetch(
        &self,
        address: Option<AddressKey>,
        largest: u64,
    ) -> Result<Reserved, RelayError> {
        let kib = kib(largest);
        let address = match address {
            Some(key) => self.per_address.try_take(key, kib).ok_or_else(|| {
                RelayError::ResourceExhausted(
                    "this address holds too many responses its clients have not read; read \
                     them, or retry later"
                        .into(),
                )
            })?,
            None => None,
        };
        let (fetches, relay) = tokio::time::timeout(self.wait, async {
            let fetches = Arc::clone(&self.fetches).acquire_many_owned(kib).await;
            let relay = Arc::clone(&self.relay).acquire_many_owned(kib).await;
            (fetches, relay)
        })
        .await
        .map_err(|_| busy())?;
        Ok(Reserved {
            relay: relay.map_err(|_| busy())?,
            fetches: fetches.map_err(|_| busy())?,
            address,
        })
    }

    /// Takes `bytes` for one streamed envelope from its address's share and
    /// the relay's budget, waiting as long as it takes (the stream only
    /// delivers later). It is not starved: Fetches never hold the reserve,
    /// and a Fetch waits in the relay's queue for `wait` at most; what other
    /// addresses hold is bounded by their shares, and what the stream's own
    /// address holds is given back once read or at the stall timeout.
    pub async fn for_stream(
        &self,
        address: Option<AddressKey>,
        bytes: u64,
    ) -> Result<HeldBytes, RelayError> {
        let kib = kib(bytes);
        let address = match address {
            Some(key) => self.per_address.take(key, kib).await,
            None => None,
        };
        let relay = Arc::clone(&self.relay)
            .acquire_many_owned(kib)
            .await
            .map_err(|_| busy())?;
        Ok(HeldBytes {
            _permits: Arc::new(Permits {
                _relay: relay,
                _fetches: None,
                _address: address,
                _connection: None,
            }),
        })
    }
}

impl ResponseBudget {
    /// [`ResponseBudget::for_stream`] if both budgets have room now, without
    /// waiting.
    pub fn try_for_stream(&self, address: Option<AddressKey>, bytes: u64) -> Option<HeldBytes> {
        let kib = kib(bytes);
        let address = match address {
            Some(key) => self.per_address.try_take(key, kib)?,
            None => None,
        };
        let relay = Arc::clone(&self.relay).try_acquire_many_owned(kib).ok()?;
        Some(HeldBytes {
            _permits: Arc::new(Permits {
                _relay: relay,
                _fetches: None,
                _address: address,
                _connection: None,
            }),
        })
    }
}

impl Reserved {
    /// The page is read and holds `bytes`: keeps that much (never more than
    /// was taken: `fetch::page` reads at most `max_fetch_bytes` and one
    /// envelope), gives the rest back, and takes it from the connection's
    /// budget at once (a connection that leaves its responses unread is
    /// refused, not waited for).
    pub fn settle(
        mut self,
        connection: Option<&ConnectionState>,
        bytes: u64,
    ) -> Result<HeldBytes, RelayError> {
        let taken = self.relay.num_permits();
        let kib = (kib(bytes) as usize).min(taken);
        let connection = match connection {
            Some(connection) => Some(
                Arc::clone(connection.responses())
                    .try_acquire_many_owned(u32::try_from(kib).unwrap_or(u32::MAX))
                    .map_err(|_| {
                        RelayError::ResourceExhausted(
                            "this connection holds too many responses its client has not read; \
                             read them, or retry later"
                                .into(),
                        )
                    })?,
            ),
            None => None,
        };
        let unused = taken - kib;
        if unused > 0 {
            drop(self.relay.split(unused));
            drop(self.fetches.split(unused));
            if let Some(address) = &mut self.address {
                drop(address.permit.split(unused));
            }
        }
        Ok(HeldBytes {
            _permits: Arc::new(Permits {
                _relay: self.relay,
                _fetches: Some(self.fetches),
                _address: self.address,
                _connection: connection,
            }),
        })
    }
}

fn busy() -> RelayError {
    RelayError::ResourceExhausted(
        "the relay holds too many responses not yet read by their clients; retry later".into(),
    )
}

/// Each source address's share of the response budget, a semaphore of KiB
/// per address that holds something (or waits for it); forgotten with its
/// last holder.
#[derive(Clone)]
struct AddressShares {
    /// One address's share in KiB; 0: none kept, nothing tracked.
    kib: usize,
    // std Mutex: a map update under it, never held across an await.
    shares: Arc<Mutex<HashMap<AddressKey, Share>>>,
}

/// One address's share and how many of [`ShareUse`] refer to it.
struct Share {
    semaphore: Arc<Semaphore>,
    users: usize,
}

/// A use of one address's share: while any lasts, the address's entry stays.
struct ShareUse {
    shares: AddressShares,
    key: AddressKey,
    semaphore: Arc<Semaphore>,
}

/// KiB of one address's share, given back on drop.
struct AddressPermit {
    // Declared first, so dropped before `_use` may forget the address.
    permit: OwnedSemaphorePermit,
    _use: ShareUse,
}

impl AddressShares {
    fn new(kib: usize) -> Self {
        Self {
            kib,
            shares: Arc::default(),
        }
    }

    /// A use of `key`'s share, its entry made if need be.
    fn share(&self, key: AddressKey) -> ShareUse {
        let mut shares = self.shares.lock().unwrap_or_else(PoisonError::into_inner);
        let share = shares.entry(key).or_insert_with(|| Share {
            semaphore: Arc::new(Semaphore::new(self.kib)),
            users: 0,
        });
        share.users += 1;
        ShareUse {
            shares: self.clone(),
            key,
            semaphore: Arc::clone(&share.semaphore),
        }
    }

    /// `kib` of `key`'s share now, or `None` when it has not that much left.
    /// `Some(None)` when no share is kept.
    fn try_take(&self, key: AddressKey, kib: u32) -> Option<Option<AddressPermit>> {
        if self.kib == 0 {
            return Some(None);
        }
        let share = self.share(key);
        let permit = Arc::clone(&share.semaphore)
            .try_acquire_many_owned(kib)
            .ok()?;
        Some(Some(AddressPermit {
            permit,
            _use: share,
        }))
    }

    /// `kib` of `key`'s share, once it has that much; `None` when no share
    /// is kept.
    async fn take(&self, key: AddressKey, kib: u32) -> Option<AddressPermit> {
        if self.kib == 0 {
            return None;
        }
        let share = self.share(key);
        // The semaphore is never closed, and `kib` never exceeds a share
        // (validated: one address's share holds the largest response).
        let permit = Arc::clone(&share.semaphore)
            .acquire_many_owned(kib)
            .await
            .ok()?;
        Some(AddressPermit {
            permit,
            _use: share,
        })
    }

    /// How many addresses hold, or wait for, part of their share (for tests).
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.shares
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for ShareUse {
    fn drop(&mut self) {
        let mut shares = self
            .shares
            .shares
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(share) = shares.get_mut(&self.key) {
            share.users = share.users.saturating_sub(1);
            if share.users == 0 {
                shares.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::address::AddressSalt;
    use super::*;

    fn key(salt: &AddressSalt, last: u8) -> AddressKey {
        salt.key(std::net::IpAddr::from([192, 0, 2, last]))
    }

    #[tokio::test]
    async fn an_address_holds_at_most_its_share_and_is_forgotten_with_its_last_bytes() {
        let salt = AddressSalt::random();
        let budget = ResponseBudget::new(1000, Duration::from_millis(50)).with_shares(750, 300);
        let (one, other) = (key(&salt, 1), key(&salt, 2));
        // A Fetch takes the largest page, 200 KiB, and keeps the 50 its page used.
        let first = budget
            .for_fetch(Some(one), 200 * 1024)
            .await
            .ok()
            .and_then(|reserved| reserved.settle(None, 50 * 1024).ok());
        assert!(first.is_some());
        // 250 KiB left of the share: another largest page fits, a third not.
        let second = budget.for_fetch(Some(one), 200 * 1024).await.ok();
        assert!(second.is_some());
        assert!(budget.for_fetch(Some(one), 200 * 1024).await.is_err());
        assert!(budget.for_fetch(Some(other), 200 * 1024).await.is_ok());
        drop(second);
        assert!(budget.for_fetch(Some(one), 200 * 1024).await.is_ok());
        assert_eq!(budget.per_address.addresses(), 1);
        drop(first);
        assert_eq!(budget.per_address.addresses(), 0);
    }

    #[tokio::test]
    async fn fetches_leave_the_reserve_to_streams() {
        let budget = ResponseBudget::new(1000, Duration::from_millis(50)).with_shares(600, 0);
        let mut held = Vec::new();
        while let Ok(reserved) = budget.for_fetch(None, 100 * 1024).await {
            held.push(reserved.settle(None, 100 * 1024).ok());
        }
        assert_eq!(held.len(), 6);
        let streamed = tokio::time::timeout(
            Duration::from_millis(100),
            budget.for_stream(None, 400 * 1024),
        )
        .await;
        assert!(matches!(streamed, Ok(Ok(_))));
        // A page that used little gives the rest back to the next Fetch.
        held.clear();
        let reserved = budget.for_fetch(None, 600 * 1024).await.ok();
        let small = reserved.and_then(|reserved| reserved.settle(None, 1).ok());
        assert!(small.is_some());
        assert_eq!(budget.fetches.available_permits(), 599);
    }
}
