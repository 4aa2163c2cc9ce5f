//! Counts per source address and network, in memory only, keyed by a per-boot
//! salted hash.
//!
//! The relay must not record who connects (DESIGN "No record, enforced"), yet one
//! address, or one network, must not take every connection or stream (review
//! H1, M1; fresh adversarial review). So an
//! accepted peer address is hashed at once with a random salt drawn when the
//! relay starts and never written anywhere; the address itself is dropped. The
//! hash is kept only while that address has something open, and it is never
//! logged, stored or put in an error. After a restart the salt is new, so no
//! hash can be matched across boots, or against a list of addresses by anyone
//! who does not hold this process's memory.
//!
//! IPv6 addresses count by their /64 prefix: one subscriber is usually given a
//! whole /64, so counting full addresses would let one machine take a cap per
//! address it picks. But one subscriber may well hold many /64s (a /56 is an
//! ordinary home delegation, a tunnel broker gives a /48 for free), so what
//! every address wants is also capped, or shared, per network: an IPv6 /48,
//! an IPv4 address alone ([`PerSource`], [`AddressSalt::network_key`]).
//! IPv4-mapped IPv6 addresses count as their IPv4 address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest as _, Sha256};

/// A salted hash of one source address (IPv6: its /64) or network (IPv6: its
/// /48); see the module docs.
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

    /// The key that `address` counts under: an IPv4 address alone, an IPv6
    /// address by its /64.
    pub fn key(&self, address: IpAddr) -> AddressKey {
        self.hash(b"haven.relay.address", address, 8)
    }

    /// The key of `address`'s network, for the shares of something every
    /// address wants (the response budget) and the network tier of the
    /// connection and stream caps ([`PerSource`]): an IPv4 address alone, an IPv6
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

/// Which of a source's caps refused one more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crowded {
    /// Its address (IPv6: its /64) holds the per-address maximum.
    Address,
    /// Its network (IPv6: its /48) holds the per-network maximum.
    Network,
}

/// How many of something each source holds, in two tiers: at most
/// `per_address` per address key ([`AddressSalt::key`], IPv6 by /64) and at
/// most `per_network` per network key ([`AddressSalt::network_key`], IPv6 by
/// /48); 0 turns a tier off. A /56 is an ordinary home delegation and a /48
/// comes free from a tunnel broker, so the /64 tier alone let 40 of one
/// network's /64s hold every connection slot (fresh adversarial review). An
/// IPv4 address is its own network: both tiers count the same things, and as
/// the network cap is never below the address cap, the address cap is the
/// one that binds.
///
/// The network tier binds only while the whole count is at least
/// `network_from` ([`PerSource::with_network_cap_from`]): a carrier that gives
/// each subscriber a /64 of one shared /48 puts many people in one network,
/// and a hard cap let one of them (three /64s of 256 connections, or two of
/// 500 streams) lock all the others out while the relay had room (second
/// fresh review M2). With room, only each /64's own cap holds; once the relay
/// fills past that mark, one network can take no more than its share.
#[derive(Clone)]
pub struct PerSource {
    per_address: usize,
    per_network: usize,
    network_from: usize,
    // std Mutex: two map updates under it, never held across an await; one
    // lock for both tiers, so a refusal by one never leaves a count in the other.
    open: Arc<Mutex<Open>>,
}

/// What each key of each tier holds now; a key at zero is forgotten.
#[derive(Default)]
struct Open {
    addresses: HashMap<AddressKey, usize>,
    networks: HashMap<AddressKey, usize>,
    /// Everything counted in the network tier, from every network.
    total: usize,
}

/// One counted thing of one source; given back on drop.
pub struct SourceSlot {
    counts: Option<PerSource>,
    address: Option<AddressKey>,
    network: Option<AddressKey>,
}

impl PerSource {
    /// Counts with caps of `per_address` per address and `per_network` per
    /// network; 0 turns a tier off (nothing is then tracked for it at all).
    pub fn new(per_address: usize, per_network: usize) -> Self {
        Self {
            per_address,
            per_network,
            network_from: 0,
            open: Arc::default(),
        }
    }

    /// The same counts, with the network cap binding only while at least
    /// `total` things are counted in all (see the type's documentation).
    #[must_use]
    pub fn with_network_cap_from(self, total: usize) -> Self {
        Self {
            network_from: total,
            ..self
        }
    }

    /// One more for the source with these keys, unless its address or its
    /// network already holds its maximum; then which one, and nothing is
    /// counted.
    pub fn take(&self, address: AddressKey, network: AddressKey) -> Result<SourceSlot, Crowded> {
        if self.per_address == 0 && self.per_network == 0 {
            return Ok(SourceSlot {
                counts: None,
                address: None,
                network: None,
            });
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let address = (self.per_address != 0).then_some(address);
        let network = (self.per_network != 0).then_some(network);
        let held =
            |map: &HashMap<AddressKey, usize>, key: &AddressKey| map.get(key).copied().unwrap_or(0);
        if address.is_some_and(|key| held(&open.addresses, &key) >= self.per_address) {
            return Err(Crowded::Address);
        }
        if open.total >= self.network_from
            && network.is_some_and(|key| held(&open.networks, &key) >= self.per_network)
        {
            return Err(Crowded::Network);
        }
        if let Some(key) = address {
            *open.addresses.entry(key).or_default() += 1;
        }
        if let Some(key) = network {
            *open.networks.entry(key).or_default() += 1;
            open.total += 1;
        }
        Ok(SourceSlot {
            counts: Some(self.clone()),
            address,
            network,
        })
    }

    /// How many addresses and networks hold something now (for tests).
    pub fn sources(&self) -> (usize, usize) {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        (open.addresses.len(), open.networks.len())
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let Some(counts) = &self.counts else {
            return;
        };
        let mut open = counts.open.lock().unwrap_or_else(PoisonError::into_inner);
        let open = &mut *open;
        for (map, key) in [
            (&mut open.addresses, self.address),
            (&mut open.networks, self.network),
        ] {
            let Some(key) = key else {
                continue;
            };
            if let Some(count) = map.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    map.remove(&key);
                }
            }
        }
        if self.network.is_some() {
            open.total = open.total.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::from([0; 4]))
    }

    #[test]
    fn an_address_is_capped_and_its_slots_come_back() {
        let salt = AddressSalt::random();
        let counts = PerSource::new(2, 0);
        let keys = |text: &str| (salt.key(ip(text)), salt.network_key(ip(text)));
        let (one, one_network) = keys("192.0.2.1");
        let (other, other_network) = keys("192.0.2.2");
        let first = counts.take(one, one_network);
        let second = counts.take(one, one_network);
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(counts.take(one, one_network).err(), Some(Crowded::Address));
        assert!(counts.take(other, other_network).is_ok());
        drop(first);
        assert!(counts.take(one, one_network).is_ok());
        drop(second);
        assert_eq!(counts.sources(), (0, 0));
        let off = PerSource::new(0, 0);
        let slot = off.take(one, one_network);
        assert!(slot.is_ok());
        assert_eq!(
            off.sources(),
            (0, 0),
            "nothing is tracked with both caps off"
        );
    }

    /// Fresh adversarial review: connections and streams were capped per /64
    /// only, so one /56 or /48 (40 of its /64s) took every connection slot.
    /// Three /64s of one /48 now hold at most its network cap together,
    /// while another /48 is still served.
    #[test]
    fn the_64s_of_one_48_together_hold_at_most_the_network_cap() {
        let salt = AddressSalt::random();
        let counts = PerSource::new(2, 4);
        let keys = |text: &str| (salt.key(ip(text)), salt.network_key(ip(text)));
        let mut held = Vec::new();
        for source in ["2001:db8:7:1::1", "2001:db8:7:2::1"] {
            let (address, network) = keys(source);
            for _ in 0..2 {
                held.push(counts.take(address, network));
            }
            assert_eq!(
                counts.take(address, network).err(),
                Some(Crowded::Address),
                "the /64 cap still holds"
            );
        }
        assert!(held.iter().all(Result::is_ok));
        // The fifth of the /48, from a third /64 with nothing of its own.
        let (third, third_network) = keys("2001:db8:7:3::1");
        assert_eq!(
            counts.take(third, third_network).err(),
            Some(Crowded::Network)
        );
        let (elsewhere, elsewhere_network) = keys("2001:db8:8:1::1");
        let served = counts.take(elsewhere, elsewhere_network);
        assert!(served.is_ok(), "another /48 is served");
        // A refusal counted nothing; a slot given back is the network's again.
        assert_eq!(counts.sources(), (3, 2));
        held.pop();
        let again = counts.take(third, third_network);
        assert!(again.is_ok());
        drop((held, served, again));
        assert_eq!(counts.sources(), (0, 0), "every count is forgotten at zero");
    }

    /// An IPv4 address is its own network: the network cap, never below the
    /// address cap, never refuses first.
    #[test]
    fn an_ipv4_address_is_refused_by_its_address_cap_not_its_network_cap() {
        let salt = AddressSalt::random();
        let counts = PerSource::new(2, 2);
        let (address, network) = (salt.key(ip("192.0.2.9")), salt.network_key(ip("192.0.2.9")));
        let held = (counts.take(address, network), counts.take(address, network));
        assert!(held.0.is_ok() && held.1.is_ok());
        assert_eq!(counts.take(address, network).err(), Some(Crowded::Address));
        let (next, next_network) = (
            salt.key(ip("192.0.2.10")),
            salt.network_key(ip("192.0.2.10")),
        );
        assert!(counts.take(next, next_network).is_ok());
    }

    /// Synthetic IPv6 addresses: every /64 of one /48 (across a /56 and
    /// beyond it) has one network key and its own address key; another /48
    /// has another network key.
    #[test]
    fn the_64s_of_one_48_share_a_network_key_and_other_48s_do_not() {
        let salt = AddressSalt::random();
        let in_48 =
            |subnet: u16, host: u16| IpAddr::from([0x2001, 0x0db8, 0x0042, subnet, 0, 0, 0, host]);
        let network = salt.network_key(in_48(0, 1));
        for subnet in [0x0000, 0x0001, 0x00ff, 0x0100, 0xff00, 0xffff] {
            assert_eq!(salt.network_key(in_48(subnet, 7)), network);
            if subnet != 0 {
                assert_ne!(salt.key(in_48(subnet, 7)), salt.key(in_48(0, 7)));
            }
        }
        for other in [
            IpAddr::from([0x2001, 0x0db8, 0x0043, 0, 0, 0, 0, 1]),
            IpAddr::from([0x2001, 0x0db9, 0x0042, 0, 0, 0, 0, 1]),
        ] {
            assert_ne!(salt.network_key(other), network);
        }
    }

    #[test]
    fn ipv6_counts_by_its_64_prefix_its_network_by_48_and_mapped_ipv4_as_ipv4() {
        let salt = AddressSalt::random();
        let key = |text: &str| salt.key(ip(text));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        let network = |text: &str| salt.network_key(ip(text));
        assert_eq!(network("2001:db8:1:2::1"), network("2001:db8:1:ffff::1"));
        assert_ne!(network("2001:db8:1:2::1"), network("2001:db8:2:2::1"));
        assert_eq!(network("::ffff:192.0.2.7"), network("192.0.2.7"));
        assert_ne!(network("192.0.2.7"), network("192.0.2.8"));
        assert_ne!(network("192.0.2.7"), key("192.0.2.7"));
        // Another boot's salt gives another key.
        assert_ne!(AddressSalt::random().key(ip("192.0.2.7")), key("192.0.2.7"));
    }
}
