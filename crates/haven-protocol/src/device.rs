//! A device's long-lived keys: its identity and its prekeys, and accepting the
//! initial messages of new conversations.

use std::collections::{BTreeMap, HashSet, VecDeque};

use rand_core::CryptoRng;
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use crate::codec::{Reader, Writer};
use crate::identity::{IdentityKey, IdentityKeyPair};
use crate::padding::unpad;
use crate::pqxdh::{InitialHeader, associated_data, respond};
use crate::prekey::{
    KemPrekey, OneTimePrekey, PrekeyBundle, PublicPrekey, PublishedPrekeys, SignedPrekey,
};
use crate::ratchet::Ratchet;
use crate::{DecodeError, HandshakeError, Session};

/// How long a signed prekey (and the last-resort ML-KEM prekey) is used before a
/// new one replaces it: a week, as Signal's clients do. The previous one is kept
/// for one more period, so initial messages made from a bundle fetched just
/// before the rotation still work, and then destroyed (PQXDH section 3: forward
/// secrecy for first messages needs the old secrets gone).
pub const SIGNED_PREKEY_ROTATION_SECONDS: u64 = 7 * 24 * 60 * 60;
/// How many accepted handshakes' base keys are remembered to refuse replays of
/// initial messages (those without a one-time prekey in particular).
pub const REMEMBERED_HANDSHAKES: usize = 10_000;
/// Most one-time prekeys of each kind a device holds.
pub const MAX_ONE_TIME_PREKEYS: usize = 1000;

const SNAPSHOT_TAG: u8 = 0x40;
/// Version 2: the last-resort KEM prekey rotates (its creation time and the
/// previous one are kept), and the newest published one-time prekey id.
const SNAPSHOT_VERSION: u8 = 2;

/// A device: identity and prekeys. No `Debug`, no `Clone`; persist it with
/// [`Device::to_snapshot`].
pub struct Device {
    identity: IdentityKeyPair,
    signed_prekey: SignedPrekey,
    previous_signed_prekey: Option<SignedPrekey>,
    one_time_prekeys: BTreeMap<u32, OneTimePrekey>,
    kem_last_resort: KemPrekey,
    /// When `kem_last_resort` was made (seconds since the Unix epoch).
    kem_created_at: u64,
    /// The last-resort KEM prekey it replaced, kept one more period.
    previous_kem_last_resort: Option<KemPrekey>,
    kem_one_time_prekeys: BTreeMap<u32, KemPrekey>,
    next_id: u32,
    /// One-time prekeys with ids up to this one were handed to the relay
    /// already; only newer ones are uploaded (review #9: a republished prekey
    /// the relay had handed out would be handed out twice).
    published_through: u32,
    /// Base keys of accepted handshakes, oldest first, and the same as a set for
    /// constant-time lookups.
    accepted_base_keys: VecDeque<[u8; 32]>,
    accepted_lookup: HashSet<[u8; 32]>,
}

impl Device {
    /// A new device with a fresh identity, signed prekey and last-resort KEM prekey
    /// (no one-time prekeys yet: see [`Device::generate_one_time_prekeys`]).
    pub fn generate<R: CryptoRng + ?Sized>(now: u64, rng: &mut R) -> Self {
        let identity = IdentityKeyPair::generate(rng);
        let signed_prekey = SignedPrekey::generate(&identity, 1, now, rng);
        let kem_last_resort = KemPrekey::generate(&identity, 2, false, rng);
        Self {
            identity,
            signed_prekey,
            previous_signed_prekey: None,
            one_time_prekeys: BTreeMap::new(),
            kem_last_resort,
            kem_created_at: now,
            previous_kem_last_resort: None,
            kem_one_time_prekeys: BTreeMap::new(),
            next_id: 3,
            published_through: 2,
            accepted_base_keys: VecDeque::new(),
            accepted_lookup: HashSet::new(),
        }
    }

    /// The device's identity secrets, for sealing and starting sessions.
    pub fn identity(&self) -> &IdentityKeyPair {
        &self.identity
    }

    /// The device's public identity.
    pub fn identity_key(&self) -> &IdentityKey {
        self.identity.public()
    }

    fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// Adds `count` one-time prekeys of each kind (X25519 and ML-KEM), at most
    /// [`MAX_ONE_TIME_PREKEYS`]; returns how many of each were added.
    ///
    /// At the cap the oldest ones are destroyed to make room (review
    /// 2026-12-crypto follow-up): every claim that never turns into a first
    /// contact leaves one behind here, and without eviction the device would
    /// fill up and could never be contacted again. The oldest were handed out
    /// the longest ago, so they are the likeliest to be such orphans.
    pub fn generate_one_time_prekeys<R: CryptoRng + ?Sized>(
        &mut self,
        count: usize,
        rng: &mut R,
    ) -> usize {
        let count = count.min(MAX_ONE_TIME_PREKEYS);
        while self.one_time_prekeys.len() + count > MAX_ONE_TIME_PREKEYS {
            self.one_time_prekeys.pop_first();
        }
        while self.kem_one_time_prekeys.len() + count > MAX_ONE_TIME_PREKEYS {
            self.kem_one_time_prekeys.pop_first();
        }
        for _ in 0..count {
            let id = self.take_id();
            let secret = StaticSecret::random_from_rng(rng);
            let prekey = OneTimePrekey::from_secret(&self.identity, id, secret);
            self.one_time_prekeys.insert(id, prekey);
            let id = self.take_id();
            self.kem_one_time_prekeys
                .insert(id, KemPrekey::generate(&self.identity, id, true, rng));
        }
        count
    }

    /// Everything the device publishes to the relay: identity, signed and
    /// last-resort prekeys, and every unused one-time prekey.
    pub fn published_prekeys(&self) -> PublishedPrekeys {
        self.prekeys_after(0)
    }

    /// What the next upload carries: identity, the current signed and
    /// last-resort prekeys, and only the one-time prekeys never published
    /// before. Call [`Device::mark_published`] once the relay accepted it.
    pub fn prekeys_to_publish(&self) -> PublishedPrekeys {
        self.prekeys_after(self.published_through)
    }

    /// Records that every one-time prekey made so far has reached the relay.
    pub fn mark_published(&mut self) {
        self.published_through = self.next_id.wrapping_sub(1);
    }

    fn prekeys_after(&self, published_through: u32) -> PublishedPrekeys {
        let kem = |prekey: &KemPrekey| PublicPrekey {
            id: prekey.id,
            one_time: prekey.one_time,
            public_key: prekey.public.to_vec(),
            signature: prekey.signature,
        };
        PublishedPrekeys {
            identity: self.identity.public().to_bytes(),
            signed_prekey: PublicPrekey {
                id: self.signed_prekey.id,
                one_time: false,
                public_key: self.signed_prekey.public.as_bytes().to_vec(),
                signature: self.signed_prekey.signature,
            },
            kem_last_resort: kem(&self.kem_last_resort),
            one_time: self
                .one_time_prekeys
                .range(published_through.saturating_add(1)..)
                .map(|(_, prekey)| PublicPrekey {
                    id: prekey.id,
                    one_time: false,
                    public_key: prekey.public.as_bytes().to_vec(),
                    signature: prekey.signature,
                })
                .collect(),
            kem_one_time: self
                .kem_one_time_prekeys
                .range(published_through.saturating_add(1)..)
                .map(|(_, prekey)| kem(prekey))
                .collect(),
        }
    }

    /// Ids of the unused one-time X25519 prekeys.
    pub fn one_time_prekey_ids(&self) -> Vec<u32> {
        self.one_time_prekeys.keys().copied().collect()
    }

    /// Ids of the unused one-time ML-KEM prekeys.
    pub fn kem_one_time_prekey_ids(&self) -> Vec<u32> {
        self.kem_one_time_prekeys.keys().copied().collect()
    }

    /// Replaces the signed prekey and the last-resort KEM prekey, each when it
    /// is older than [`SIGNED_PREKEY_ROTATION_SECONDS`]; the replaced one is
    /// kept for one more period, and the one it replaced (two periods old) is
    /// destroyed. Returns whether anything changed, so the caller republishes.
    pub fn rotate_prekeys_if_due<R: CryptoRng + ?Sized>(&mut self, now: u64, rng: &mut R) -> bool {
        let due =
            |created_at: u64| now.saturating_sub(created_at) >= SIGNED_PREKEY_ROTATION_SECONDS;
        let mut changed = false;
        if due(self.signed_prekey.created_at) {
            self.rotate_signed_prekey(now, rng);
            changed = true;
        }
        if due(self.kem_created_at) {
            self.rotate_kem_last_resort(now, rng);
            changed = true;
        }
        changed
    }

    /// Replaces both now, whatever their age (after a suspected compromise): the
    /// replaced ones are kept one more period as usual; the ones before them go.
    pub fn rotate_prekeys<R: CryptoRng + ?Sized>(&mut self, now: u64, rng: &mut R) {
        self.rotate_signed_prekey(now, rng);
        self.rotate_kem_last_resort(now, rng);
    }

    fn rotate_signed_prekey<R: CryptoRng + ?Sized>(&mut self, now: u64, rng: &mut R) {
        let id = self.take_id();
        let fresh = SignedPrekey::generate(&self.identity, id, now, rng);
        self.previous_signed_prekey = Some(std::mem::replace(&mut self.signed_prekey, fresh));
    }

    fn rotate_kem_last_resort<R: CryptoRng + ?Sized>(&mut self, now: u64, rng: &mut R) {
        let id = self.take_id();
        let fresh = KemPrekey::generate(&self.identity, id, false, rng);
        self.previous_kem_last_resort = Some(std::mem::replace(&mut self.kem_last_resort, fresh));
        self.kem_created_at = now;
    }

    /// A bundle with the current signed prekey, the given one-time X25519 prekey
    /// (or none), and the given one-time ML-KEM prekey (or the last-resort one).
    /// `None` when an id is not an unused prekey of this device.
    pub fn bundle(
        &self,
        one_time_prekey: Option<u32>,
        kem_one_time_prekey: Option<u32>,
    ) -> Option<PrekeyBundle> {
        let one_time_prekey = match one_time_prekey {
            Some(id) => {
                let prekey = self.one_time_prekeys.get(&id)?;
                Some((id, prekey.public, prekey.signature))
            }
            None => None,
        };
        let kem = match kem_one_time_prekey {
            Some(id) => self.kem_one_time_prekeys.get(&id)?,
            None => &self.kem_last_resort,
        };
        Some(PrekeyBundle {
            identity: *self.identity.public(),
            signed_prekey_id: self.signed_prekey.id,
            signed_prekey: self.signed_prekey.public,
            signed_prekey_signature: self.signed_prekey.signature,
            one_time_prekey,
            kem_prekey_id: kem.id,
            kem_one_time: kem.one_time,
            kem_prekey: kem.public.clone(),
            kem_prekey_signature: kem.signature,
        })
    }

    /// Accepts the first message of a new conversation: completes PQXDH as the
    /// responder, decrypts the message, and only then consumes the one-time
    /// prekeys it used. A replay, an unknown prekey or a message that does not
    /// decrypt changes nothing.
    pub fn accept<R: CryptoRng + ?Sized>(
        &mut self,
        initial_message: &[u8],
        rng: &mut R,
    ) -> Result<(Session, Zeroizing<Vec<u8>>), HandshakeError> {
        let (header, inner) = InitialHeader::unwrap(initial_message)?;
        if self.accepted_lookup.contains(&header.base_key) {
            return Err(HandshakeError::Replay);
        }
        let signed_prekey = [
            Some(&self.signed_prekey),
            self.previous_signed_prekey.as_ref(),
        ]
        .into_iter()
        .flatten()
        .find(|prekey| prekey.id == header.signed_prekey_id)
        .ok_or(HandshakeError::UnknownSignedPrekey)?;
        let one_time_prekey = match header.one_time_prekey_id {
            Some(id) => Some(
                &self
                    .one_time_prekeys
                    .get(&id)
                    .ok_or(HandshakeError::UnknownOneTimePrekey)?
                    .secret,
            ),
            None => None,
        };
        let kem = [
            Some(&self.kem_last_resort),
            self.previous_kem_last_resort.as_ref(),
        ]
        .into_iter()
        .flatten()
        .find(|prekey| prekey.id == header.kem_prekey_id)
        .or_else(|| self.kem_one_time_prekeys.get(&header.kem_prekey_id))
        .ok_or(HandshakeError::UnknownKemPrekey)?;
        let kem_secret = kem.decapsulate(&header.kem_ciphertext);
        let shared_key = respond(
            &self.identity,
            &header,
            &signed_prekey.secret,
            one_time_prekey,
            &kem.public[..],
            &kem_secret,
        )?;
        let mut ratchet = Ratchet::responder(&shared_key, signed_prekey.secret.clone());
        let associated_data = associated_data(&header.initiator, self.identity.public());
        let padded = ratchet.decrypt(inner, &associated_data, rng)?;
        let plaintext = Zeroizing::new(unpad(&padded).map_err(HandshakeError::Message)?.to_vec());
        // Success: consume what the handshake used, remember it against replays.
        if let Some(id) = header.one_time_prekey_id {
            self.one_time_prekeys.remove(&id);
        }
        self.kem_one_time_prekeys.remove(&header.kem_prekey_id);
        if self.accepted_base_keys.len() == REMEMBERED_HANDSHAKES
            && let Some(oldest) = self.accepted_base_keys.pop_front()
        {
            self.accepted_lookup.remove(&oldest);
        }
        self.accepted_base_keys.push_back(header.base_key);
        self.accepted_lookup.insert(header.base_key);
        Ok((
            Session::accepted(ratchet, *self.identity.public(), &header),
            plaintext,
        ))
    }

    /// The device's state as versioned bytes, for the SDK to store (encrypted).
    pub fn to_snapshot(&self) -> Zeroizing<Vec<u8>> {
        // Room for everything written below, so the secrets are never copied
        // by a reallocation.
        let capacity = 2
            + 64
            + 2 * (1 + 4 + 8 + 32)
            + 4
            + self.one_time_prekeys.len() * 36
            + 2 * (1 + 4 + 64 + 8)
            + 4
            + self.kem_one_time_prekeys.len() * 68
            + 12
            + self.accepted_base_keys.len() * 32;
        let mut writer = Writer::with_capacity(SNAPSHOT_TAG, SNAPSHOT_VERSION, capacity);
        writer.fixed(&self.identity.secret_bytes()[..]);
        write_signed(&mut writer, &self.signed_prekey);
        match &self.previous_signed_prekey {
            Some(prekey) => {
                writer.u8(1);
                write_signed(&mut writer, prekey);
            }
            None => {
                writer.u8(0);
            }
        }
        writer.u32(len32(self.one_time_prekeys.len()));
        for prekey in self.one_time_prekeys.values() {
            writer.u32(prekey.id).fixed(prekey.secret.as_bytes());
        }
        writer
            .u32(self.kem_last_resort.id)
            .fixed(&self.kem_last_resort.seed[..])
            .u64(self.kem_created_at);
        match &self.previous_kem_last_resort {
            Some(prekey) => {
                writer.u8(1).u32(prekey.id).fixed(&prekey.seed[..]);
            }
            None => {
                writer.u8(0);
            }
        }
        writer.u32(len32(self.kem_one_time_prekeys.len()));
        for prekey in self.kem_one_time_prekeys.values() {
            writer.u32(prekey.id).fixed(&prekey.seed[..]);
        }
        writer
            .u32(self.next_id)
            .u32(self.published_through)
            .u32(len32(self.accepted_base_keys.len()));
        for base_key in &self.accepted_base_keys {
            writer.fixed(base_key);
        }
        Zeroizing::new(writer.finish())
    }

    /// Restores a device from [`Device::to_snapshot`]. Signatures are recomputed
    /// (Ed25519 is deterministic), so they come out identical.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes, SNAPSHOT_TAG, SNAPSHOT_VERSION)?;
        let identity = IdentityKeyPair::from_secret_bytes(&Zeroizing::new(reader.array::<64>()?));
        let signed_prekey = read_signed(&mut reader, &identity)?;
        let previous_signed_prekey = match reader.u8()? {
            0 => None,
            1 => Some(read_signed(&mut reader, &identity)?),
            _ => return Err(DecodeError::Invalid("previous signed prekey flag")),
        };
        let count = reader.count(36, MAX_ONE_TIME_PREKEYS)?;
        let mut one_time_prekeys = BTreeMap::new();
        for _ in 0..count {
            let id = reader.u32()?;
            if one_time_prekeys
                .last_key_value()
                .is_some_and(|(last, _)| *last >= id)
            {
                return Err(DecodeError::Invalid("one-time prekey order"));
            }
            let secret = StaticSecret::from(*Zeroizing::new(reader.array::<32>()?));
            one_time_prekeys.insert(id, OneTimePrekey::from_secret(&identity, id, secret));
        }
        let kem_last_resort = read_kem(&mut reader, &identity, false)?;
        let kem_created_at = reader.u64()?;
        let previous_kem_last_resort = match reader.u8()? {
            0 => None,
            1 => Some(read_kem(&mut reader, &identity, false)?),
            _ => return Err(DecodeError::Invalid("previous post-quantum prekey flag")),
        };
        let count = reader.count(68, MAX_ONE_TIME_PREKEYS)?;
        let mut kem_one_time_prekeys = BTreeMap::new();
        for _ in 0..count {
            let prekey = read_kem(&mut reader, &identity, true)?;
            if kem_one_time_prekeys
                .last_key_value()
                .is_some_and(|(last, _)| *last >= prekey.id)
            {
                return Err(DecodeError::Invalid("post-quantum prekey order"));
            }
            kem_one_time_prekeys.insert(prekey.id, prekey);
        }
        let next_id = reader.u32()?;
        let published_through = reader.u32()?;
        let count = reader.count(32, REMEMBERED_HANDSHAKES)?;
        let mut accepted_base_keys = VecDeque::with_capacity(count);
        let mut accepted_lookup = HashSet::with_capacity(count);
        for _ in 0..count {
            let base_key = reader.array::<32>()?;
            if !accepted_lookup.insert(base_key) {
                return Err(DecodeError::Invalid("repeated handshake base key"));
            }
            accepted_base_keys.push_back(base_key);
        }
        reader.finish()?;
        Ok(Self {
            identity,
            signed_prekey,
            previous_signed_prekey,
            one_time_prekeys,
            kem_last_resort,
            kem_created_at,
            previous_kem_last_resort,
            kem_one_time_prekeys,
            next_id,
            published_through,
            accepted_base_keys,
            accepted_lookup,
        })
    }
}

fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn write_signed(writer: &mut Writer, prekey: &SignedPrekey) {
    writer
        .u32(prekey.id)
        .u64(prekey.created_at)
        .fixed(prekey.secret.as_bytes());
}

fn read_signed(
    reader: &mut Reader<'_>,
    identity: &IdentityKeyPair,
) -> Result<SignedPrekey, DecodeError> {
    let id = reader.u32()?;
    let created_at = reader.u64()?;
    let secret = StaticSecret::from(*Zeroizing::new(reader.array::<32>()?));
    Ok(SignedPrekey::from_secret(identity, id, created_at, secret))
}

fn read_kem(
    reader: &mut Reader<'_>,
    identity: &IdentityKeyPair,
    one_time: bool,
) -> Result<KemPrekey, DecodeError> {
    let id = reader.u32()?;
    let seed = Zeroizing::new(reader.array::<64>()?);
    Ok(KemPrekey::from_seed(identity, id, one_time, seed))
}
