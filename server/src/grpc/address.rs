//! Counts per source address, in memory only, keyed by a per-boot salted hash.
//!
//! The relay must not record who connects (DESIGN "No record, enforced"), yet one
//! address must not take every connection or stream (review H1, M1). So an
//! accepted peer address is hashed at once with a random salt drawn when the
//! relay starts and never written anywhere; the address itself is dropped. The
//! hash is kept only while that address has something open, and it is never
//! logged, stored or put in an error. After a restart the salt is new, so no
//! hash can be matched across boots, or against a list of addresses by anyone
//! who does not hold this process's memory.
//!
//! IPv6 addresses count by their /64 prefix: one subscriber is usually given a
//! whole /64, so counting full addresses would let one machine take a cap per
//! address it picks. IPv4-mapped IPv6 addresses count as their IPv4 address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest as _, Sha256};

/// A salted hash of one source address (or IPv6 /64); see the module docs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey([u8; 16]);

impl std::fmt::Debug for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressKey(..)")
    }
}

/// The per-boot salt, drawn once per relay process.
#[derive(Clone)]
pub struct AddressSalt([u8; 32]);

impl AddressSalt {
    /// A fresh random salt.
    pub fn random() -> Self {
        let mut salt = [0u8; 32];
        rand::fill(&mut salt);
        Self(salt)
    }

    /// The key that `address` counts under.
    pub fn key(&self, address: IpAddr) -> AddressKey {
        self.hash(b"haven.relay.address", address, 8)
    }

    /// The key of `address`'s network, for the shares of something every
    /// address wants (the response budget): an IPv4 address alone, an IPv6
    /// address by its /48, the block one site (or one customer of many
    /// providers) is given. Counting such a share per /64 let one /48 take
    /// 65 536 of them (second fresh review F4).
    pub fn network_key(&self, address: IpAddr) -> AddressKey {
        self.hash(b"haven.relay.network", address, 6)
    }

    /// The salted hash of `address`, an IPv6 address by its first
    /// `v6_prefix_bytes`.
    fn hash(&self, label: &[u8], address: IpAddr, v6_prefix_bytes: usize) -> AddressKey {
        let mut hash = Sha256::new();
        hash.update(label);
        hash.update(self.0);
        match address {
            IpAddr::V4(v4) => {
                hash.update([4]);
                hash.update(v4.octets());
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => {
                    hash.update([4]);
                    hash.update(v4.octets());
                }
                None => {
                    hash.update([6]);
                    hash.update(&v6.octets()[..v6_prefix_bytes]);
                }
            },
        }
        let digest: [u8; 32] = hash.finalize().into();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        AddressKey(key)
    }
}

impl std::fmt::Debug for AddressSalt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AddressSalt(..)")
    }
}

/// How many of something each address holds, at most `max` (0: no cap).
#[derive(Clone)]
pub struct PerAddress {
    max: usize,
    // std Mutex: a map update under it, never held across an await.
    open: Arc<Mutex<HashMap<AddressKey, usize>>>,
}

/// One counted thing of one address; given back on drop.
pub struct AddressSlot {
    counts: PerAddress,
    key: AddressKey,
}

impl PerAddress {
    /// Counts with a cap of `max` per address; 0 turns the cap off (nothing is
    /// then tracked at all).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// One more for `key`, unless it already holds the maximum. `Some(None)`
    /// when the cap is off.
    pub fn take(&self, key: AddressKey) -> Option<Option<AddressSlot>> {
        if self.max == 0 {
            return Some(None);
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_default();
        if *count >= self.max {
            if *count == 0 {
                open.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(Some(AddressSlot {
            counts: self.clone(),
            key,
        }))
    }

    /// How many addresses hold something now (for tests and metrics).
    pub fn addresses(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .counts
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_capped_and_its_slots_come_back() {
        let salt = AddressSalt::random();
        let counts = PerAddress::new(2);
        let one = salt.key("192.0.2.1".parse().unwrap_or(IpAddr::from([0; 4])));
        let other = salt.key("192.0.2.2".parse().unwrap_or(IpAddr::from([0; 4])));
        let first = counts.take(one);
        let second = counts.take(one);
        assert!(first.is_some() && second.is_some());
        assert!(counts.take(one).is_none());
        assert!(counts.take(other).is_some());
        drop(first);
        assert!(counts.take(one).is_some());
        drop(second);
        assert_eq!(counts.addresses(), 0);
        assert!(matches!(PerAddress::new(0).take(one), Some(None)));
    }

    #[test]
    fn ipv6_counts_by_its_64_prefix_its_network_by_48_and_mapped_ipv4_as_ipv4() {
        let salt = AddressSalt::random();
        let key = |text: &str| salt.key(text.parse().unwrap_or(IpAddr::from([0; 4])));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        let network = |text: &str| salt.network_key(text.parse().unwrap_or(IpAddr::from([0; 4])));
        assert_eq!(network("2001:db8:1:2::1"), network("2001:db8:1:ffff::1"));
        assert_ne!(network("2001:db8:1:2::1"), network("2001:db8:2:2::1"));
        assert_eq!(network("::ffff:192.0.2.7"), network("192.0.2.7"));
        assert_ne!(network("192.0.2.7"), network("192.0.2.8"));
        assert_ne!(network("192.0.2.7"), key("192.0.2.7"));
        // Another boot's salt gives another key.
        assert_ne!(
            AddressSalt::random().key("192.0.2.7".parse().unwrap_or(IpAddr::from([0; 4]))),
            key("192.0.2.7")
        );
    }
}
