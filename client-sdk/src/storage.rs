//! On-device state: sled under the data directory, every value sealed with
//! ChaCha20-Poly1305 under the storage key the app gets from the platform
//! keystore. Nothing in the files is readable without that key.
//!
//! Each value is `version ‖ random 96-bit nonce ‖ ciphertext`, with associated
//! data `haven-sdk/v1 ‖ tree ‖ key`, so a value cannot be moved to another key or
//! tree unnoticed. Keys are not sealed: the SDK only uses random ids, constants,
//! counters and keyed hashes as keys, never names, contents or relay ids.
//!
//! Values that belong to a conversation are sealed under one of that
//! conversation's keys in the key file instead of the storage key (see
//! `keyfile`), so destroying those keys shreds what sled's log still holds.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use zeroize::Zeroizing;

use crate::Error;
use crate::keyfile::{KeyFile, Label};

const VERSION: u8 = 1;
const AAD_DOMAIN: &[u8] = b"haven-sdk/v1";
const NONCE_LEN: usize = 12;
/// A sealed value whose only job is to tell a wrong storage key from a corrupt store.
const CANARY: &[u8] = b"canary";

/// A key and its opened value.
pub type Entry = (Vec<u8>, Zeroizing<Vec<u8>>);

/// The sealed store. No `Debug`: it holds the storage key's cipher.
pub struct SealedStore {
    db: sled::Db,
    cipher: ChaCha20Poly1305,
    keys: KeyFile,
}

/// A namespace of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    /// Single values: the device, the supporter identity, settings.
    State,
    /// Conversations, by conversation id.
    Conversations,
    /// Message history, by conversation id ‖ sequence number.
    History,
}

impl Tree {
    fn name(self) -> &'static str {
        match self {
            Tree::State => "state",
            Tree::Conversations => "conversations",
            Tree::History => "history",
        }
    }
}

fn aad(tree: Tree, key: &[u8]) -> Vec<u8> {
    [AAD_DOMAIN, tree.name().as_bytes(), &[0], key].concat()
}

fn storage(error: impl std::fmt::Display) -> Error {
    Error::Storage(error.to_string())
}

fn seal(cipher: &ChaCha20Poly1305, tree: Tree, key: &[u8], value: &[u8]) -> Result<Vec<u8>, Error> {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let sealed = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: value,
                aad: &aad(tree, key),
            },
        )
        .map_err(|_| Error::Storage("sealing failed".into()))?;
    let mut stored = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    stored.push(VERSION);
    stored.extend_from_slice(&nonce);
    stored.extend_from_slice(&sealed);
    Ok(stored)
}

/// Opens a stored value; `None` when it does not open under `cipher`.
fn unseal(
    cipher: &ChaCha20Poly1305,
    tree: Tree,
    key: &[u8],
    stored: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
    let (&version, rest) = stored
        .split_first()
        .ok_or_else(|| Error::Storage("a stored value is empty".into()))?;
    if version != VERSION || rest.len() < NONCE_LEN {
        return Err(Error::Storage("stored value has an unknown format".into()));
    }
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| Error::Storage("stored value has an unknown format".into()))?;
    Ok(cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: sealed,
                aad: &aad(tree, key),
            },
        )
        .ok()
        .map(Zeroizing::new))
}

/// How long opening waits for another holder of the directory's lock to let
/// go. sled releases its file lock only when the last of its background
/// threads has let go of the database, which on a loaded device can be a
/// little after the client that used it was dropped; an app that closes and
/// reopens its client must not be told the directory is in use by another.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the sled database at `path`, waiting up to [`LOCK_WAIT`] for its lock.
fn open_db(path: &Path) -> Result<sled::Db, Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(io)) if io.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::Storage(
                        "this data directory is open in another client (one client per data directory)"
                            .into(),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(other) => return Err(storage(other)),
        }
    }
}

impl SealedStore {
    /// Opens (or creates) the store in the data directory `dir` (sled under
    /// `state/`, conversation keys in `keys`), checking that `storage_key` is the
    /// key it was created with.
    pub fn open(dir: &Path, storage_key: &Zeroizing<[u8; 32]>) -> Result<Self, Error> {
        let db = open_db(&dir.join("state"))?;
        let cipher = ChaCha20Poly1305::new(&Key::from(**storage_key));
        let canary = db
            .open_tree(Tree::State.name())
            .and_then(|tree| tree.get(CANARY))
            .map_err(storage)?;
        let fresh = match canary {
            Some(stored) => match unseal(&cipher, Tree::State, CANARY, &stored)? {
                Some(value) if &value[..] == CANARY => false,
                _ => return Err(Error::WrongStorageKey),
            },
            None => true,
        };
        // Only once the storage key is known to be right is the key file read.
        let keys = KeyFile::open(&dir.join("keys"), cipher.clone())?;
        let store = Self { db, cipher, keys };
        if fresh {
            store.put(Tree::State, CANARY, CANARY)?;
            store.flush()?;
        }
        Ok(store)
    }

    fn tree(&self, tree: Tree) -> Result<sled::Tree, Error> {
        self.db.open_tree(tree.name()).map_err(storage)
    }

    /// Seals and stores `value` under `key`.
    pub fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), Error> {
        let stored = seal(&self.cipher, tree, key, value)?;
        self.tree(tree)?.insert(key, stored).map_err(storage)?;
        Ok(())
    }

    /// The value under `key`, opened.
    pub fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        let Some(stored) = self.tree(tree)?.get(key).map_err(storage)? else {
            return Ok(None);
        };
        unseal(&self.cipher, tree, key, &stored)?
            .map(Some)
            .ok_or(Error::WrongStorageKey)
    }

    /// Seals `value` under the key-file key for `label` (created, and synced,
    /// first if needed) and stores it under `key`.
    pub fn put_under(
        &self,
        label: &Label,
        tree: Tree,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), Error> {
        let sealing = self.keys.get_or_create(label)?;
        let stored = seal(
            &ChaCha20Poly1305::new(&Key::from(*sealing)),
            tree,
            key,
            value,
        )?;
        self.tree(tree)?.insert(key, stored).map_err(storage)?;
        Ok(())
    }

    /// The value under `key`, opened with the key for `label`; `None` when there
    /// is no value or its key has been destroyed.
    pub fn get_under(
        &self,
        label: &Label,
        tree: Tree,
        key: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
        let Some(sealing) = self.keys.get(label)? else {
            return Ok(None);
        };
        let Some(stored) = self.tree(tree)?.get(key).map_err(storage)? else {
            return Ok(None);
        };
        unseal(
            &ChaCha20Poly1305::new(&Key::from(*sealing)),
            tree,
            key,
            &stored,
        )?
        .map(Some)
        .ok_or_else(|| Error::Storage("a stored value does not open (tampered with?)".into()))
    }

    /// Destroys the key-file keys `doomed` picks (see `keyfile`).
    pub fn destroy_keys(&self, doomed: impl Fn(&Label) -> bool) -> Result<usize, Error> {
        self.keys.destroy(doomed)
    }

    /// Every label with a key in the key file.
    pub fn key_labels(&self) -> Result<Vec<Label>, Error> {
        self.keys.labels()
    }

    /// The keys (not values) under `prefix`, in order.
    pub fn keys_with_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
        self.tree(tree)?
            .scan_prefix(prefix)
            .keys()
            .map(|key| key.map(|k| k.to_vec()).map_err(storage))
            .collect()
    }

    /// Every value under keys starting with `prefix`, opened, in key order.
    pub fn scan_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<Vec<Entry>, Error> {
        let mut out = Vec::new();
        for entry in self.tree(tree)?.scan_prefix(prefix).keys() {
            let key = entry.map_err(storage)?.to_vec();
            if let Some(value) = self.get(tree, &key)? {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// Removes every value under keys starting with `prefix`.
    pub fn remove_prefix(&self, tree: Tree, prefix: &[u8]) -> Result<(), Error> {
        let tree = self.tree(tree)?;
        for key in tree.scan_prefix(prefix).keys() {
            tree.remove(key.map_err(storage)?).map_err(storage)?;
        }
        Ok(())
    }

    /// The last key under `prefix`, if any.
    pub fn last_key(&self, tree: Tree, prefix: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self
            .tree(tree)?
            .scan_prefix(prefix)
            .keys()
            .next_back()
            .transpose()
            .map_err(storage)?
            .map(|k| k.to_vec()))
    }

    /// Every key of `tree` (keys are ids, never contents).
    pub fn keys(&self, tree: Tree) -> Result<Vec<Vec<u8>>, Error> {
        self.keys_with_prefix(tree, &[])
    }

    /// Removes the value under `key`.
    pub fn remove(&self, tree: Tree, key: &[u8]) -> Result<(), Error> {
        self.tree(tree)?.remove(key).map_err(storage)?;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), Error> {
        self.db.flush().map(|_| ()).map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_bytes(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(path) = stack.pop() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.extend(std::fs::read(&path).unwrap_or_default());
                }
            }
        }
        out
    }

    #[test]
    fn values_are_unreadable_on_disk_and_need_the_right_key() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(storage)?;
        let key = Zeroizing::new([7u8; 32]);
        let marker = b"I have not slept properly for weeks";
        {
            let store = SealedStore::open(dir.path(), &key)?;
            store.put(Tree::State, b"note", marker)?;
            store.flush()?;
            assert_eq!(
                store
                    .get(Tree::State, b"note")?
                    .as_deref()
                    .map(Vec::as_slice),
                Some(&marker[..])
            );
        }
        let files = all_bytes(dir.path());
        assert!(!files.is_empty());
        assert!(
            !files.windows(marker.len()).any(|w| w == marker),
            "plaintext on disk"
        );
        assert!(matches!(
            SealedStore::open(dir.path(), &Zeroizing::new([8u8; 32])),
            Err(Error::WrongStorageKey)
        ));
        let store = SealedStore::open(dir.path(), &key)?;
        assert_eq!(
            store
                .get(Tree::State, b"note")?
                .as_deref()
                .map(Vec::as_slice),
            Some(&marker[..])
        );
        store.remove(Tree::State, b"note")?;
        assert!(store.get(Tree::State, b"note")?.is_none());
        Ok(())
    }

    #[test]
    fn a_value_moved_to_another_key_does_not_open() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(storage)?;
        let store = SealedStore::open(dir.path(), &Zeroizing::new([7u8; 32]))?;
        store.put(Tree::State, b"a", b"value of a")?;
        let raw = store
            .tree(Tree::State)?
            .get(b"a")
            .map_err(storage)?
            .unwrap_or_default();
        store
            .tree(Tree::State)?
            .insert(b"b", raw)
            .map_err(storage)?;
        assert!(matches!(
            store.get(Tree::State, b"b"),
            Err(Error::WrongStorageKey)
        ));
        Ok(())
    }
}
