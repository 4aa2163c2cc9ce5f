//! The Double Ratchet, as Signal's specification defines it (revision 4):
//! KDF_RK = HKDF-SHA256 keyed by the root key, KDF_CK = HMAC-SHA256 with
//! constants 0x01/0x02, ENCRYPT = ChaCha20-Poly1305 with key and nonce derived
//! from the message key by HKDF, associated data = session AD ‖ encoded header.
//!
//! One deviation, for defence in depth (review 2026-12-crypto #2): every message
//! carries 16 fresh random bytes in its header, used as the HKDF salt of the
//! message-key expansion. A message key is still meant to encrypt once; should a
//! state ever be rolled back (a restored backup, a bug) and a chain key reused,
//! the two messages still get different ChaCha20 keys and nonces, so there is
//! no keystream or Poly1305 key reuse. The salt is authenticated (it is in the
//! header, which is in the associated data).
//!
//! Out-of-order delivery is bounded: at most [`MAX_SKIP`] message keys are
//! skipped in one chain, and at most [`MAX_SKIPPED_KEYS`] are kept in all,
//! oldest evicted first. A message key is used once and deleted. Decryption
//! works on a copy of the state and commits only on success, so a forged or
//! corrupted message changes nothing.

use std::collections::{HashMap, VecDeque};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_core::CryptoRng;
use x25519_dalek::{PublicKey as DhPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::codec::{Reader, Writer};
use crate::kdf::{MESSAGE_KEY_INFO, hkdf, kdf_ck, kdf_rk};
use crate::{DecodeError, MessageError};

/// Most message keys skipped within one receiving chain. Signal's
/// implementations use 2000; 1000 covers a phone offline through a long
/// conversation while bounding the work a forged header can cause.
pub const MAX_SKIP: u32 = 1000;
/// Most skipped message keys kept across all chains; the oldest are evicted.
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// How many earlier receiving ratchet keys are remembered, so that a late
/// duplicate from an old chain is reported as a duplicate, not as a forgery.
const REMEMBERED_CHAINS: usize = 16;

pub(crate) const MESSAGE_TAG: u8 = 0x21;
const MESSAGE_VERSION: u8 = 2;
/// Bytes of fresh randomness per message, the salt of its key expansion.
const SALT_LEN: usize = 16;
/// Tag, version, ratchet key, previous chain length, message number, salt.
pub(crate) const HEADER_LEN: usize = 2 + 32 + 4 + 4 + SALT_LEN;
const TAG_LEN: usize = 16;

/// One ratchet message's header.
#[derive(Clone, Copy)]
struct Header {
    dh: [u8; 32],
    previous: u32,
    number: u32,
    salt: [u8; SALT_LEN],
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::new(MESSAGE_TAG, MESSAGE_VERSION);
        writer
            .fixed(&self.dh)
            .u32(self.previous)
            .u32(self.number)
            .fixed(&self.salt);
        writer.finish()
    }
}

/// Splits a ratchet message into its header and ciphertext.
fn parse(message: &[u8]) -> Result<(Header, &[u8], &[u8]), DecodeError> {
    let mut reader = Reader::new(message, MESSAGE_TAG, MESSAGE_VERSION)?;
    let dh = reader.array::<32>()?;
    let previous = reader.u32()?;
    let number = reader.u32()?;
    let salt = reader.array::<SALT_LEN>()?;
    let ciphertext = reader.rest();
    if ciphertext.len() < TAG_LEN {
        return Err(DecodeError::Truncated);
    }
    Ok((
        Header {
            dh,
            previous,
            number,
            salt,
        },
        &message[..HEADER_LEN],
        ciphertext,
    ))
}

/// The skipped-message-key store: bounded, oldest evicted first.
#[derive(Clone, Default)]
struct Skipped {
    keys: HashMap<([u8; 32], u32), Zeroizing<[u8; 32]>>,
    order: VecDeque<([u8; 32], u32)>,
}

impl Skipped {
    fn insert(&mut self, dh: [u8; 32], number: u32, key: Zeroizing<[u8; 32]>) {
        while self.keys.len() >= MAX_SKIPPED_KEYS {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.keys.remove(&oldest);
                }
                None => break,
            }
        }
        self.keys.insert((dh, number), key);
        self.order.push_back((dh, number));
    }

    fn take(&mut self, dh: &[u8; 32], number: u32) -> Option<Zeroizing<[u8; 32]>> {
        let key = self.keys.remove(&(*dh, number))?;
        self.order.retain(|entry| entry != &(*dh, number));
        Some(key)
    }
}

/// The state of one side of a Double Ratchet session. No `Debug`: it is all secrets.
#[derive(Clone)]
pub(crate) struct Ratchet {
    root_key: Zeroizing<[u8; 32]>,
    sending_secret: StaticSecret,
    sending_public: DhPublic,
    receiving: Option<[u8; 32]>,
    sending_chain: Option<Zeroizing<[u8; 32]>>,
    receiving_chain: Option<Zeroizing<[u8; 32]>>,
    sent: u32,
    received: u32,
    previous_sent: u32,
    skipped: Skipped,
    earlier_receiving: VecDeque<[u8; 32]>,
}

fn agree(secret: &StaticSecret, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, MessageError> {
    let shared = secret.diffie_hellman(&DhPublic::from(*public));
    if !shared.was_contributory() {
        return Err(MessageError::NonContributory);
    }
    Ok(Zeroizing::new(*shared.as_bytes()))
}

/// ENCRYPT/DECRYPT's keys: a ChaCha20-Poly1305 key and nonce from the message key
/// and the message's salt. The nonce may be derived because every message key
/// encrypts exactly once; the salt keeps that so even if a key were reused.
fn message_cipher(message_key: &[u8; 32], salt: &[u8; SALT_LEN]) -> (ChaCha20Poly1305, Nonce) {
    let okm = hkdf::<44>(salt, message_key, MESSAGE_KEY_INFO);
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&okm[..32]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    (ChaCha20Poly1305::new(&Key::from(*key)), Nonce::from(nonce))
}

impl Ratchet {
    /// RatchetInitAlice: the initiator starts with a sending chain towards the
    /// responder's signed prekey.
    pub(crate) fn initiator<R: CryptoRng + ?Sized>(
        shared_key: &[u8; 32],
        responder_key: &[u8; 32],
        rng: &mut R,
    ) -> Result<Self, MessageError> {
        let sending_secret = StaticSecret::random_from_rng(rng);
        let dh = agree(&sending_secret, responder_key)?;
        let (root_key, sending_chain) = kdf_rk(shared_key, &dh);
        Ok(Self::fresh(
            root_key,
            sending_secret,
            Some(*responder_key),
            Some(sending_chain),
        ))
    }

    /// RatchetInitBob: the responder starts from its signed prekey and waits for
    /// the initiator's first ratchet key.
    pub(crate) fn responder(shared_key: &[u8; 32], signed_prekey: StaticSecret) -> Self {
        Self::fresh(Zeroizing::new(*shared_key), signed_prekey, None, None)
    }

    /// A state with no messages sent or received yet.
    fn fresh(
        root_key: Zeroizing<[u8; 32]>,
        sending_secret: StaticSecret,
        receiving: Option<[u8; 32]>,
        sending_chain: Option<Zeroizing<[u8; 32]>>,
    ) -> Self {
        Self {
            root_key,
            sending_public: DhPublic::from(&sending_secret),
            sending_secret,
            receiving,
            sending_chain,
            receiving_chain: None,
            sent: 0,
            received: 0,
            previous_sent: 0,
            skipped: Skipped::default(),
            earlier_receiving: VecDeque::new(),
        }
    }

    /// Encrypts `plaintext` (already padded) as the next message of the sending chain.
    pub(crate) fn encrypt<R: CryptoRng + ?Sized>(
        &mut self,
        plaintext: &[u8],
        associated_data: &[u8],
        rng: &mut R,
    ) -> Result<Vec<u8>, MessageError> {
        let chain = self
            .sending_chain
            .as_ref()
            .ok_or(MessageError::NoSendingChain)?;
        let (next_chain, message_key) = kdf_ck(chain);
        let mut salt = [0u8; SALT_LEN];
        rng.fill_bytes(&mut salt);
        let header = Header {
            dh: self.sending_public.to_bytes(),
            previous: self.previous_sent,
            number: self.sent,
            salt,
        };
        let mut out = header.encode();
        let (cipher, nonce) = message_cipher(&message_key, &header.salt);
        let aad = [associated_data, &out].concat();
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| MessageError::Authentication)?;
        out.extend_from_slice(&ciphertext);
        self.sending_chain = Some(next_chain);
        self.sent = self
            .sent
            .checked_add(1)
            .ok_or(MessageError::TooFarAhead { max: MAX_SKIP })?;
        Ok(out)
    }

    /// Decrypts a ratchet message; the state changes only if it authenticates.
    pub(crate) fn decrypt<R: CryptoRng + ?Sized>(
        &mut self,
        message: &[u8],
        associated_data: &[u8],
        rng: &mut R,
    ) -> Result<Zeroizing<Vec<u8>>, MessageError> {
        let (header, header_bytes, ciphertext) = parse(message)?;
        let aad = [associated_data, header_bytes].concat();
        let mut next = self.clone();
        let message_key = next.message_key(&header, rng)?;
        let (cipher, nonce) = message_cipher(&message_key, &header.salt);
        let plaintext = cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| MessageError::Authentication)?;
        *self = next;
        Ok(Zeroizing::new(plaintext))
    }

    /// Finds or derives the key of the message with `header`, advancing the state.
    fn message_key<R: CryptoRng + ?Sized>(
        &mut self,
        header: &Header,
        rng: &mut R,
    ) -> Result<Zeroizing<[u8; 32]>, MessageError> {
        if let Some(key) = self.skipped.take(&header.dh, header.number) {
            return Ok(key);
        }
        if self.receiving.as_ref() == Some(&header.dh) {
            if self.receiving_chain.is_none() {
                // Only the responder's signed prekey is known without a chain, and
                // the responder never sends under it.
                return Err(MessageError::Authentication);
            }
            if header.number < self.received {
                return Err(MessageError::Duplicate);
            }
        } else {
            if self.earlier_receiving.contains(&header.dh) {
                return Err(MessageError::Duplicate);
            }
            self.skip_until(header.previous)?;
            self.dh_ratchet(&header.dh, rng)?;
        }
        self.skip_until(header.number)?;
        let chain = self
            .receiving_chain
            .as_ref()
            .ok_or(MessageError::Duplicate)?;
        let (next_chain, message_key) = kdf_ck(chain);
        self.receiving_chain = Some(next_chain);
        self.received += 1;
        Ok(message_key)
    }

    /// SkipMessageKeys: stores the keys of the current receiving chain up to `until`.
    fn skip_until(&mut self, until: u32) -> Result<(), MessageError> {
        let (Some(dh), Some(chain)) = (self.receiving, self.receiving_chain.as_ref()) else {
            return Ok(());
        };
        if until > self.received.saturating_add(MAX_SKIP) {
            return Err(MessageError::TooFarAhead { max: MAX_SKIP });
        }
        let mut chain = chain.clone();
        while self.received < until {
            let (next_chain, message_key) = kdf_ck(&chain);
            self.skipped.insert(dh, self.received, message_key);
            chain = next_chain;
            self.received += 1;
        }
        self.receiving_chain = Some(chain);
        Ok(())
    }

    /// DHRatchet: a new receiving chain from the peer's new key, then a new
    /// sending key pair and sending chain.
    fn dh_ratchet<R: CryptoRng + ?Sized>(
        &mut self,
        remote: &[u8; 32],
        rng: &mut R,
    ) -> Result<(), MessageError> {
        self.previous_sent = self.sent;
        self.sent = 0;
        self.received = 0;
        if let Some(earlier) = self.receiving.replace(*remote) {
            if self.earlier_receiving.len() == REMEMBERED_CHAINS {
                self.earlier_receiving.pop_front();
            }
            self.earlier_receiving.push_back(earlier);
        }
        let (root_key, receiving_chain) =
            kdf_rk(&self.root_key, &*agree(&self.sending_secret, remote)?);
        self.root_key = root_key;
        self.receiving_chain = Some(receiving_chain);
        self.sending_secret = StaticSecret::random_from_rng(rng);
        self.sending_public = DhPublic::from(&self.sending_secret);
        let (root_key, sending_chain) =
            kdf_rk(&self.root_key, &*agree(&self.sending_secret, remote)?);
        self.root_key = root_key;
        self.sending_chain = Some(sending_chain);
        Ok(())
    }

    /// Writes the state for a snapshot. Contains no used message key: used keys
    /// are deleted the moment they decrypt.
    pub(crate) fn write(&self, writer: &mut Writer) {
        writer
            .fixed(&self.root_key[..])
            .fixed(self.sending_secret.as_bytes())
            .u8(u8::from(self.receiving.is_some()))
            .fixed(&self.receiving.unwrap_or_default())
            .u8(u8::from(self.sending_chain.is_some()))
            .fixed(self.sending_chain.as_deref().unwrap_or(&[0u8; 32]))
            .u8(u8::from(self.receiving_chain.is_some()))
            .fixed(self.receiving_chain.as_deref().unwrap_or(&[0u8; 32]))
            .u32(self.sent)
            .u32(self.received)
            .u32(self.previous_sent)
            .u32(u32::try_from(self.skipped.order.len()).unwrap_or(u32::MAX));
        for entry in &self.skipped.order {
            if let Some(key) = self.skipped.keys.get(entry) {
                writer.fixed(&entry.0).u32(entry.1).fixed(&key[..]);
            }
        }
        writer.u32(u32::try_from(self.earlier_receiving.len()).unwrap_or(u32::MAX));
        for key in &self.earlier_receiving {
            writer.fixed(key);
        }
    }

    pub(crate) fn read(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let root_key = Zeroizing::new(reader.array::<32>()?);
        let sending_secret = StaticSecret::from(*Zeroizing::new(reader.array::<32>()?));
        let receiving = optional(reader)?;
        let sending_chain = optional(reader)?.map(Zeroizing::new);
        let receiving_chain = optional(reader)?.map(Zeroizing::new);
        let sent = reader.u32()?;
        let received = reader.u32()?;
        let previous_sent = reader.u32()?;
        let count = reader.count(32 + 4 + 32, MAX_SKIPPED_KEYS)?;
        let mut skipped = Skipped::default();
        for _ in 0..count {
            let dh = reader.array::<32>()?;
            let number = reader.u32()?;
            if skipped.keys.contains_key(&(dh, number)) {
                return Err(DecodeError::Invalid("repeated skipped message key"));
            }
            skipped.insert(dh, number, Zeroizing::new(reader.array::<32>()?));
        }
        let count = reader.count(32, REMEMBERED_CHAINS)?;
        let mut earlier_receiving = VecDeque::with_capacity(count);
        for _ in 0..count {
            earlier_receiving.push_back(reader.array::<32>()?);
        }
        Ok(Self {
            root_key,
            sending_public: DhPublic::from(&sending_secret),
            sending_secret,
            receiving,
            sending_chain,
            receiving_chain,
            sent,
            received,
            previous_sent,
            skipped,
            earlier_receiving,
        })
    }
}

fn optional(reader: &mut Reader<'_>) -> Result<Option<[u8; 32]>, DecodeError> {
    let present = reader.u8()?;
    let value = reader.array::<32>()?;
    match present {
        // Absent values are written as zeros; anything else is not our encoding.
        0 if value == [0u8; 32] => Ok(None),
        1 => Ok(Some(value)),
        _ => Err(DecodeError::Invalid("presence flag")),
    }
}
