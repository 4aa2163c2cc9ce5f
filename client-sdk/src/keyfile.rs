//! Conversation keys, kept apart from sled so that they can really be destroyed.
//!
//! sled is log-structured: a removed value stays in its log until the segment is
//! rewritten, so deleting a conversation's records from sled does not erase
//! them from the disk. Everything of a conversation is therefore sealed under
//! keys of its own, kept here, in one file of fixed-size slots that are
//! overwritten in place and synced when a key is destroyed. Once a
//! conversation ends (or a stretch of its history passes its retention), its
//! keys are zeroed on disk, and whatever sled still holds of it cannot be
//! opened, even with the storage key (the relay's crypto-shredding, on the
//! device). Like the relay's, this relies on the filesystem overwriting in
//! place; copy-on-write filesystems, snapshots and backups defeat it
//! (docs/operations.md and ARCHITECTURE.md say so).
//!
//! A slot is [`SLOT_LEN`] bytes: `1 ‖ nonce (12) ‖ ChaCha20-Poly1305(label ‖ key)`
//! sealed under the storage key with associated data `haven-sdk/keys/v1 ‖
//! slot index`, zero-padded; a free slot is all zeros. Labels are sealed too, so
//! the file shows only how many keys exist.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, Payload};
use zeroize::Zeroizing;

use crate::Error;

/// What a key is for: a conversation id and a scope within it (see `Scope`).
pub(crate) type Label = [u8; LABEL_LEN];
const LABEL_LEN: usize = 24;
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const SEALED_LEN: usize = LABEL_LEN + KEY_LEN + TAG_LEN;
/// 1 + 12 + 72 = 85 bytes used, padded to 96 so slots stay aligned to 32 bytes.
pub(crate) const SLOT_LEN: usize = 96;
const AAD_DOMAIN: &[u8] = b"haven-sdk/keys/v1";

/// The key file. No `Debug`: it holds keys.
pub(crate) struct KeyFile {
    cipher: ChaCha20Poly1305,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    keys: HashMap<Label, (u64, Zeroizing<[u8; KEY_LEN]>)>,
    free: Vec<u64>,
    slots: u64,
}

fn storage(error: impl std::fmt::Display) -> Error {
    Error::Storage(format!("key file: {error}"))
}

fn aad(slot: u64) -> Vec<u8> {
    [AAD_DOMAIN, &slot.to_be_bytes()].concat()
}

impl KeyFile {
    /// Opens (or creates) the key file at `path`. `cipher` is the storage key's.
    pub(crate) fn open(path: &Path, cipher: ChaCha20Poly1305) -> Result<Self, Error> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(storage)?;
        let mut bytes = Zeroizing::new(Vec::new());
        file.read_to_end(&mut bytes).map_err(storage)?;
        // A slot torn by a crash while it was appended was never used (a key is
        // synced before anything is sealed under it): drop it.
        let slots = (bytes.len() / SLOT_LEN) as u64;
        if bytes.len() % SLOT_LEN != 0 {
            file.set_len(slots * SLOT_LEN as u64).map_err(storage)?;
        }
        let mut keys = HashMap::new();
        let mut free = Vec::new();
        for (slot, raw) in bytes.chunks_exact(SLOT_LEN).enumerate() {
            let slot = slot as u64;
            let nonce: [u8; NONCE_LEN] = raw[1..1 + NONCE_LEN].try_into().map_err(storage)?;
            let opened = (raw[0] == 1)
                .then(|| {
                    cipher
                        .decrypt(
                            &nonce.into(),
                            Payload {
                                msg: &raw[1 + NONCE_LEN..1 + NONCE_LEN + SEALED_LEN],
                                aad: &aad(slot),
                            },
                        )
                        .ok()
                })
                .flatten()
                .map(Zeroizing::new);
            match opened {
                Some(plain) => {
                    let label: Label = plain[..LABEL_LEN].try_into().map_err(storage)?;
                    let key: [u8; KEY_LEN] = plain[LABEL_LEN..].try_into().map_err(storage)?;
                    keys.insert(label, (slot, Zeroizing::new(key)));
                }
                // Free, or a slot whose write was torn before it was synced.
                None => free.push(slot),
            }
        }
        Ok(Self {
            cipher,
            inner: Mutex::new(Inner {
                file,
                keys,
                free,
                slots,
            }),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, Error> {
        self.inner
            .lock()
            .map_err(|_| Error::Storage("key file: a previous writer panicked".into()))
    }

    /// The key for `label`, if it exists (it may have been destroyed).
    pub(crate) fn get(&self, label: &Label) -> Result<Option<Zeroizing<[u8; KEY_LEN]>>, Error> {
        Ok(self.lock()?.keys.get(label).map(|(_, key)| key.clone()))
    }

    /// The key for `label`, created and synced to disk first if it does not exist.
    pub(crate) fn get_or_create(&self, label: &Label) -> Result<Zeroizing<[u8; KEY_LEN]>, Error> {
        let mut inner = self.lock()?;
        if let Some((_, key)) = inner.keys.get(label) {
            return Ok(key.clone());
        }
        Self::create(&self.cipher, &mut inner, label, None)
    }

    /// A fresh key for `label`, synced to disk before it is returned. An
    /// existing key for `label` is overwritten in its own slot, so the old key
    /// is gone from the file once this returns.
    pub(crate) fn replace(&self, label: &Label) -> Result<Zeroizing<[u8; KEY_LEN]>, Error> {
        let mut inner = self.lock()?;
        let slot = inner.keys.get(label).map(|(slot, _)| *slot);
        Self::create(&self.cipher, &mut inner, label, slot)
    }

    fn create(
        cipher: &ChaCha20Poly1305,
        inner: &mut Inner,
        label: &Label,
        slot: Option<u64>,
    ) -> Result<Zeroizing<[u8; KEY_LEN]>, Error> {
        let key = Zeroizing::new(rand::random::<[u8; KEY_LEN]>());
        let slot = match slot.or_else(|| inner.free.pop()) {
            Some(slot) => slot,
            None => {
                inner.slots += 1;
                inner.slots - 1
            }
        };
        let mut plain = Zeroizing::new([0u8; LABEL_LEN + KEY_LEN]);
        plain[..LABEL_LEN].copy_from_slice(label);
        plain[LABEL_LEN..].copy_from_slice(&key[..]);
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: &plain[..],
                    aad: &aad(slot),
                },
            )
            .map_err(|_| Error::Storage("key file: sealing failed".into()))?;
        let mut raw = [0u8; SLOT_LEN];
        raw[0] = 1;
        raw[1..1 + NONCE_LEN].copy_from_slice(&nonce);
        raw[1 + NONCE_LEN..1 + NONCE_LEN + SEALED_LEN].copy_from_slice(&sealed);
        if let Err(error) = write_slot(&mut inner.file, slot, &raw)
            .and_then(|()| inner.file.sync_data().map_err(storage))
        {
            // A slot overwritten in place may hold the old key, the new one or
            // a torn mix: the old key is no longer to be relied on either way.
            inner.keys.remove(label);
            inner.free.push(slot);
            return Err(error);
        }
        inner.keys.insert(*label, (slot, key.clone()));
        Ok(key)
    }

    /// Destroys every key whose label `doomed` picks: zeroes its slot on disk
    /// and syncs. Returns how many were destroyed.
    pub(crate) fn destroy(&self, doomed: impl Fn(&Label) -> bool) -> Result<usize, Error> {
        let mut inner = self.lock()?;
        let labels: Vec<Label> = inner.keys.keys().filter(|l| doomed(l)).copied().collect();
        let mut zeroed = Vec::with_capacity(labels.len());
        for label in &labels {
            let Some((slot, _)) = inner.keys.get(label) else {
                continue;
            };
            let slot = *slot;
            write_slot(&mut inner.file, slot, &[0u8; SLOT_LEN])?;
            zeroed.push((*label, slot));
        }
        if !labels.is_empty() {
            // Only once the zeros are on disk are the keys forgotten and their
            // slots reused: a failed sync leaves them to be destroyed again.
            inner.file.sync_data().map_err(storage)?;
        }
        for (label, slot) in zeroed {
            inner.keys.remove(&label);
            inner.free.push(slot);
        }
        Ok(labels.len())
    }

    /// Every label that has a key.
    pub(crate) fn labels(&self) -> Result<Vec<Label>, Error> {
        Ok(self.lock()?.keys.keys().copied().collect())
    }
}

/// Overwrites one slot in place (the caller syncs).
fn write_slot(file: &mut File, slot: u64, raw: &[u8; SLOT_LEN]) -> Result<(), Error> {
    file.seek(SeekFrom::Start(slot * SLOT_LEN as u64))
        .map_err(storage)?;
    file.write_all(raw).map_err(storage)
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::{Key, KeyInit as _};

    use super::*;

    fn cipher(byte: u8) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&Key::from([byte; 32]))
    }

    #[test]
    fn keys_survive_reopening_and_destroyed_ones_leave_no_bytes_behind() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(storage)?;
        let path = dir.path().join("keys");
        let (a, b, c) = ([1u8; LABEL_LEN], [2u8; LABEL_LEN], [3u8; LABEL_LEN]);
        let (key_a, key_b, raw_b) = {
            let file = KeyFile::open(&path, cipher(7))?;
            let key_a = file.get_or_create(&a)?;
            let key_b = file.get_or_create(&b)?;
            assert_eq!(file.get_or_create(&a)?, key_a, "one key per label");
            let raw = std::fs::read(&path).map_err(storage)?;
            assert_eq!(raw.len(), 2 * SLOT_LEN);
            for key in [&key_a, &key_b] {
                assert!(
                    !raw.windows(KEY_LEN).any(|w| w == &key[..]),
                    "a key in the clear"
                );
            }
            let raw_b = raw[SLOT_LEN..2 * SLOT_LEN].to_vec();
            assert_eq!(file.destroy(|label| label == &b)?, 1);
            assert!(file.get(&b)?.is_none());
            (key_a, key_b, raw_b)
        };
        let raw = std::fs::read(&path).map_err(storage)?;
        assert!(
            !raw.windows(SLOT_LEN - 11)
                .any(|w| w == &raw_b[..SLOT_LEN - 11]),
            "the destroyed slot's bytes are still in the file"
        );
        let file = KeyFile::open(&path, cipher(7))?;
        assert_eq!(file.get(&a)?, Some(key_a));
        assert!(file.get(&b)?.is_none(), "destroyed keys stay destroyed");
        // The freed slot is reused; a new key for an old label is a new key.
        let key_c = file.get_or_create(&c)?;
        let key_b2 = file.get_or_create(&b)?;
        assert_ne!(key_b2, key_b);
        assert_ne!(key_c, key_b2);
        assert_eq!(std::fs::read(&path).map_err(storage)?.len(), 3 * SLOT_LEN);
        let mut labels = file.labels()?;
        labels.sort();
        assert_eq!(labels, [a, b, c]);
        Ok(())
    }

    #[test]
    fn torn_and_foreign_slots_are_treated_as_free() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(storage)?;
        let path = dir.path().join("keys");
        {
            let file = KeyFile::open(&path, cipher(7))?;
            file.get_or_create(&[1; LABEL_LEN])?;
        }
        // Half a slot appended by a crash, then a slot sealed under another key.
        let mut raw = std::fs::read(&path).map_err(storage)?;
        let foreign = raw.clone();
        raw.extend_from_slice(&foreign[..40]);
        std::fs::write(&path, &raw).map_err(storage)?;
        let file = KeyFile::open(&path, cipher(7))?;
        assert!(file.get(&[1; LABEL_LEN])?.is_some());
        assert_eq!(std::fs::read(&path).map_err(storage)?.len(), SLOT_LEN);
        drop(file);
        let other = KeyFile::open(&path, cipher(8))?;
        assert!(
            other.labels()?.is_empty(),
            "a slot under another key opens nothing"
        );
        Ok(())
    }
}
