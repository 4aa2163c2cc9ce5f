//! At-rest epoch keys: one ChaCha20-Poly1305 key per expiry bucket, kept in a
//! small file of fixed-size slots that is overwritten in place when a key is
//! destroyed (crypto-shredding).
//!
//! Why not keep the keys in sled: sled is log-structured and keeps old values in
//! its files after they are removed (spacejam/sled#1512), so a deleted key would
//! still be on disk. Here a destroyed key's slot is overwritten with zeros and
//! `fdatasync`ed. On a filesystem that updates blocks in place (ext4, xfs) the
//! key bytes are then gone from the file. Copy-on-write filesystems (btrfs, ZFS),
//! filesystem snapshots and SSD wear levelling may keep old blocks physically;
//! ARCHITECTURE.md tells operators to avoid snapshots of the data directory.
//!
//! Slot layout (64 bytes): version (1) ‖ zero padding (7) ‖ bucket end, u64
//! big-endian (8) ‖ key (32) ‖ first 16 bytes of SHA-256 over the first 48 bytes.
//! A slot of zeros is free; a slot whose checksum fails (a torn write) is treated
//! as free, so its envelopes — never acknowledged, since the key is synced before
//! any envelope under it is — cannot be read.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{PoisonError, RwLock};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

const SLOT_LEN: usize = 64;
const SLOT_VERSION: u8 = 1;
/// Version byte leading every sealed value, so the format can change later.
const SEALED_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
/// Domain of the associated data; binds a sealed value to its place in the store.
const AAD_DOMAIN: &[u8] = b"haven-store/envelope/v1";

/// The keys currently alive, readable from any thread.
#[derive(Default)]
pub(crate) struct KeyRing {
    // std RwLock: reads are short decryptions, writes are rare inserts/removals.
    keys: RwLock<BTreeMap<u64, BucketKey>>,
}

struct BucketKey {
    slot: u64,
    key: Zeroizing<[u8; 32]>,
}

impl KeyRing {
    /// Seals `plaintext` under the key of `bucket`, if that key exists.
    pub(crate) fn seal(&self, bucket: u64, aad: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let bucket_key = keys.get(&bucket)?;
        let cipher = ChaCha20Poly1305::new(&Key::from(*bucket_key.key));
        // Random 96-bit nonces: a key seals at most one bucket's envelopes (far fewer
        // than 2^32), so the collision probability stays negligible.
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let sealed = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        out.push(SEALED_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// Opens a value sealed by [`KeyRing::seal`]; `None` when the key is destroyed
    /// or the value does not authenticate.
    pub(crate) fn open(&self, bucket: u64, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEALED_VERSION || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let bucket_key = keys.get(&bucket)?;
        let cipher = ChaCha20Poly1305::new(&Key::from(*bucket_key.key));
        cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .ok()
    }

    /// Adds a key held elsewhere (the Redis backend keeps its keys in Redis).
    pub(crate) fn insert(&self, bucket: u64, key: Zeroizing<[u8; 32]>) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        keys.insert(bucket, BucketKey { slot: 0, key });
    }

    /// Forgets (and zeroizes) the keys of every bucket ending at or before `now`.
    pub(crate) fn forget_through(&self, now: u64) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let keep = keys.split_off(&now.saturating_add(1));
        *keys = keep;
    }

    pub(crate) fn contains(&self, bucket: u64) -> bool {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&bucket)
    }

    /// A copy of a live key, for the shredding test only.
    #[doc(hidden)]
    pub(crate) fn key_bytes(&self, bucket: u64) -> Option<Zeroizing<[u8; 32]>> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.get(&bucket).map(|k| k.key.clone())
    }
}

/// The associated data of a sealed envelope: its mailbox, id and bucket.
pub(crate) fn envelope_aad(mailbox: &[u8; 16], envelope_id: &[u8; 16], bucket: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 40);
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(mailbox);
    aad.extend_from_slice(envelope_id);
    aad.extend_from_slice(&bucket.to_be_bytes());
    aad
}

/// The key file; owned by the store's single writer.
pub(crate) struct KeyFile {
    file: File,
    slot_count: u64,
    free_slots: Vec<u64>,
}

impl KeyFile {
    /// Opens (or creates) the key file and loads every valid key into `ring`.
    pub(crate) fn open(path: &Path, ring: &KeyRing) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        let slot_count = len / SLOT_LEN as u64;
        let mut free_slots = Vec::new();
        let mut keys = ring.keys.write().unwrap_or_else(PoisonError::into_inner);
        let mut slot = Zeroizing::new([0u8; SLOT_LEN]);
        for index in 0..slot_count {
            file.read_exact_at(&mut slot[..], index * SLOT_LEN as u64)?;
            match decode_slot(&slot) {
                Some((bucket, key)) if !keys.contains_key(&bucket) => {
                    keys.insert(bucket, BucketKey { slot: index, key });
                }
                _ => free_slots.push(index),
            }
        }
        drop(keys);
        Ok(Self {
            file,
            slot_count,
            free_slots,
        })
    }

    /// Makes sure `bucket` has a key, creating and syncing one if needed.
    pub(crate) fn ensure(&mut self, ring: &KeyRing, bucket: u64) -> io::Result<()> {
        if ring.contains(bucket) {
            return Ok(());
        }
        let mut key = Zeroizing::new([0u8; 32]);
        rand::fill(&mut key[..]);
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None => {
                self.slot_count += 1;
                self.slot_count - 1
            }
        };
        let mut bytes = encode_slot(bucket, &key);
        let written = self.file.write_all_at(&bytes[..], slot * SLOT_LEN as u64);
        bytes.zeroize();
        if let Err(error) = written.and_then(|()| self.file.sync_data()) {
            self.free_slots.push(slot);
            return Err(error);
        }
        let mut keys = ring.keys.write().unwrap_or_else(PoisonError::into_inner);
        keys.insert(bucket, BucketKey { slot, key });
        Ok(())
    }

    /// Destroys the keys of every bucket ending at or before `now`: forgets them
    /// in memory (zeroized on drop), overwrites their slots with zeros and syncs.
    pub(crate) fn destroy_through(&mut self, ring: &KeyRing, now: u64) -> io::Result<u64> {
        let destroyed: Vec<BucketKey> = {
            let mut keys = ring.keys.write().unwrap_or_else(PoisonError::into_inner);
            let keep = keys.split_off(&now.saturating_add(1));
            std::mem::replace(&mut *keys, keep).into_values().collect()
        };
        if destroyed.is_empty() {
            return Ok(0);
        }
        let zeros = [0u8; SLOT_LEN];
        for bucket_key in &destroyed {
            self.file
                .write_all_at(&zeros, bucket_key.slot * SLOT_LEN as u64)?;
        }
        self.file.sync_data()?;
        self.free_slots.extend(destroyed.iter().map(|k| k.slot));
        Ok(destroyed.len() as u64)
    }
}

fn encode_slot(bucket: u64, key: &[u8; 32]) -> Zeroizing<[u8; SLOT_LEN]> {
    let mut slot = Zeroizing::new([0u8; SLOT_LEN]);
    slot[0] = SLOT_VERSION;
    slot[8..16].copy_from_slice(&bucket.to_be_bytes());
    slot[16..48].copy_from_slice(key);
    let checksum = Sha256::digest(&slot[..48]);
    slot[48..].copy_from_slice(&checksum[..16]);
    slot
}

fn decode_slot(slot: &[u8; SLOT_LEN]) -> Option<(u64, Zeroizing<[u8; 32]>)> {
    if slot[0] != SLOT_VERSION {
        return None;
    }
    let checksum = Sha256::digest(&slot[..48]);
    if checksum[..16] != slot[48..] {
        return None;
    }
    let bucket = u64::from_be_bytes(slot[8..16].try_into().ok()?);
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&slot[16..48]);
    Some((bucket, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_survive_reopen_and_destroyed_slots_are_zero() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("keys");
        let ring = KeyRing::default();
        let mut file = KeyFile::open(&path, &ring)?;
        file.ensure(&ring, 3600)?;
        file.ensure(&ring, 7200)?;
        let aad = envelope_aad(&[1; 16], &[2; 16], 3600);
        let sealed = ring
            .seal(3600, &aad, b"hello")
            .ok_or(io::ErrorKind::Other)?;
        drop(file);

        let reopened = KeyRing::default();
        let mut file = KeyFile::open(&path, &reopened)?;
        assert_eq!(
            reopened.open(3600, &aad, &sealed).as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(
            reopened.open(7200, &aad, &sealed),
            None,
            "wrong bucket key must fail"
        );
        assert_eq!(file.destroy_through(&reopened, 3600)?, 1);
        assert_eq!(reopened.open(3600, &aad, &sealed), None);
        let raw = std::fs::read(&path)?;
        assert_eq!(raw.len(), 2 * SLOT_LEN);
        assert!(
            raw.chunks(SLOT_LEN)
                .filter(|slot| slot.iter().all(|b| *b == 0))
                .count()
                == 1
        );
        // The freed slot is reused rather than the file growing.
        file.ensure(&reopened, 10_800)?;
        assert_eq!(std::fs::metadata(&path)?.len(), 2 * SLOT_LEN as u64);
        Ok(())
    }

    #[test]
    fn torn_slot_is_ignored() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("keys");
        let ring = KeyRing::default();
        KeyFile::open(&path, &ring)?.ensure(&ring, 3600)?;
        let mut raw = std::fs::read(&path)?;
        raw[20] ^= 1;
        std::fs::write(&path, &raw)?;
        let reopened = KeyRing::default();
        KeyFile::open(&path, &reopened)?;
        assert!(!reopened.contains(3600));
        Ok(())
    }

    #[test]
    fn tampered_sealed_value_does_not_open() {
        let ring = KeyRing::default();
        let dir = tempfile::tempdir().ok();
        let path = dir.as_ref().map(|d| d.path().join("k")).unwrap_or_default();
        let mut file = KeyFile::open(&path, &ring).ok();
        if let Some(file) = file.as_mut() {
            assert!(file.ensure(&ring, 60).is_ok());
        }
        let aad = envelope_aad(&[1; 16], &[2; 16], 60);
        let sealed = ring.seal(60, &aad, b"payload").unwrap_or_default();
        for index in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[index] ^= 0x40;
            assert_eq!(ring.open(60, &aad, &tampered), None, "byte {index}");
        }
        let other_aad = envelope_aad(&[1; 16], &[3; 16], 60);
        assert_eq!(ring.open(60, &other_aad, &sealed), None);
        assert_eq!(ring.open(60, &aad, &[]), None);
    }
}
