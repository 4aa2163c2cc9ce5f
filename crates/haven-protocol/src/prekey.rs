//! Prekeys and the bundle a help-seeker fetches to start a conversation.
//!
//! Per device: a signed X25519 prekey (rotated), one-time X25519 prekeys, a
//! signed last-resort ML-KEM-768 prekey and signed one-time ML-KEM-768 prekeys
//! (PQXDH, sections 2.3 and 3.2). A [`PrekeyBundle`] can only be obtained by
//! parsing bytes, which verifies every signature, or from the device itself:
//! nothing ever uses an unverified bundle.
//!
//! One deliberate addition to the specification: one-time X25519 prekeys are
//! signed too (PQXDH leaves them unsigned). A relay that substitutes or strips
//! parts of a bundle is then caught when the bundle is verified, with a clear
//! error, instead of surfacing later as a handshake the supporter cannot
//! complete. The key agreement itself is unchanged.

use ml_kem::FromSeed;
use ml_kem::kem::{Decapsulate, Encapsulate, KeyExport, TryKeyInit};
use ml_kem::{MlKem768, ml_kem_768};
use rand_core::CryptoRng;
use x25519_dalek::{PublicKey as DhPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::codec::{Reader, Writer};
use crate::identity::{IDENTITY_KEY_LEN, IdentityKey, IdentityKeyPair};
use crate::{DecodeError, VerifyError};

const SIGNED_PREKEY_DOMAIN: &[u8] = b"Haven_SignedPrekey_v1";
const ONE_TIME_PREKEY_DOMAIN: &[u8] = b"Haven_OneTimePrekey_v1";
const KEM_PREKEY_DOMAIN: &[u8] = b"Haven_KemPrekey_v1";
/// Format tag of an encoded bundle.
pub(crate) const BUNDLE_TAG: u8 = 0x10;
const BUNDLE_VERSION: u8 = 1;

/// ML-KEM-768 encapsulation key length (FIPS 203).
pub const KEM_PUBLIC_LEN: usize = 1184;
/// ML-KEM-768 ciphertext length (FIPS 203).
pub const KEM_CIPHERTEXT_LEN: usize = 1088;

/// A signed X25519 prekey with its secret.
pub(crate) struct SignedPrekey {
    pub(crate) id: u32,
    pub(crate) secret: StaticSecret,
    pub(crate) public: DhPublic,
    pub(crate) signature: [u8; 64],
    /// When it was made (caller's clock, seconds): drives rotation.
    pub(crate) created_at: u64,
}

impl SignedPrekey {
    pub(crate) fn generate<R: CryptoRng + ?Sized>(
        identity: &IdentityKeyPair,
        id: u32,
        now: u64,
        rng: &mut R,
    ) -> Self {
        Self::from_secret(identity, id, now, StaticSecret::random_from_rng(rng))
    }

    pub(crate) fn from_secret(
        identity: &IdentityKeyPair,
        id: u32,
        created_at: u64,
        secret: StaticSecret,
    ) -> Self {
        let public = DhPublic::from(&secret);
        let signature = identity.sign(&signed_prekey_payload(id, &public));
        Self {
            id,
            secret,
            public,
            signature,
            created_at,
        }
    }
}

/// A one-time X25519 prekey with its secret.
pub(crate) struct OneTimePrekey {
    pub(crate) id: u32,
    pub(crate) secret: StaticSecret,
    pub(crate) public: DhPublic,
    pub(crate) signature: [u8; 64],
}

impl OneTimePrekey {
    pub(crate) fn from_secret(identity: &IdentityKeyPair, id: u32, secret: StaticSecret) -> Self {
        let public = DhPublic::from(&secret);
        let signature = identity.sign(&one_time_prekey_payload(id, &public));
        Self {
            id,
            secret,
            public,
            signature,
        }
    }
}

/// An ML-KEM-768 prekey with its secret (kept as the 64-byte seed it expands from).
pub(crate) struct KemPrekey {
    pub(crate) id: u32,
    pub(crate) one_time: bool,
    pub(crate) seed: Zeroizing<[u8; 64]>,
    pub(crate) decapsulation: ml_kem_768::DecapsulationKey,
    pub(crate) public: Box<[u8; KEM_PUBLIC_LEN]>,
    pub(crate) signature: [u8; 64],
}

impl KemPrekey {
    pub(crate) fn generate<R: CryptoRng + ?Sized>(
        identity: &IdentityKeyPair,
        id: u32,
        one_time: bool,
        rng: &mut R,
    ) -> Self {
        let mut seed = Zeroizing::new([0u8; 64]);
        rng.fill_bytes(&mut seed[..]);
        Self::from_seed(identity, id, one_time, seed)
    }

    pub(crate) fn from_seed(
        identity: &IdentityKeyPair,
        id: u32,
        one_time: bool,
        seed: Zeroizing<[u8; 64]>,
    ) -> Self {
        let (decapsulation, encapsulation) = MlKem768::from_seed(&(*seed).into());
        let mut public = Box::new([0u8; KEM_PUBLIC_LEN]);
        public.copy_from_slice(&encapsulation.to_bytes());
        let signature = identity.sign(&kem_prekey_payload(id, one_time, &public));
        Self {
            id,
            one_time,
            seed,
            decapsulation,
            public,
            signature,
        }
    }

    /// Decapsulates; ML-KEM decapsulation never fails on a well-sized ciphertext
    /// (implicit rejection yields an unrelated key, and the AEAD then fails).
    pub(crate) fn decapsulate(&self, ciphertext: &[u8; KEM_CIPHERTEXT_LEN]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        if let Ok(shared) = self.decapsulation.decapsulate_slice(ciphertext) {
            out.copy_from_slice(&shared);
        }
        out
    }
}

fn signed_prekey_payload(id: u32, public: &DhPublic) -> Vec<u8> {
    [SIGNED_PREKEY_DOMAIN, &id.to_be_bytes(), public.as_bytes()].concat()
}

fn one_time_prekey_payload(id: u32, public: &DhPublic) -> Vec<u8> {
    [ONE_TIME_PREKEY_DOMAIN, &id.to_be_bytes(), public.as_bytes()].concat()
}

fn kem_prekey_payload(id: u32, one_time: bool, public: &[u8; KEM_PUBLIC_LEN]) -> Vec<u8> {
    [
        KEM_PREKEY_DOMAIN,
        &id.to_be_bytes(),
        &[u8::from(one_time)],
        &public[..],
    ]
    .concat()
}

/// An ML-KEM ciphertext and the shared secret it carries.
pub(crate) type Encapsulated = (Box<[u8; KEM_CIPHERTEXT_LEN]>, Zeroizing<[u8; 32]>);

/// Encapsulates to a verified ML-KEM public key.
pub(crate) fn encapsulate<R: CryptoRng + ?Sized>(
    public: &[u8; KEM_PUBLIC_LEN],
    rng: &mut R,
) -> Result<Encapsulated, DecodeError> {
    let key = ml_kem_768::EncapsulationKey::new_from_slice(public)
        .map_err(|_| DecodeError::Invalid("post-quantum prekey"))?;
    let (ciphertext, shared) = key.encapsulate_with_rng(rng);
    let mut out = Box::new([0u8; KEM_CIPHERTEXT_LEN]);
    out.copy_from_slice(&ciphertext);
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(&shared);
    Ok((out, secret))
}

/// What a help-seeker needs from the relay to start a conversation with one
/// device. Every signature has been verified; see the module documentation.
#[derive(Clone, PartialEq, Eq)]
pub struct PrekeyBundle {
    pub(crate) identity: IdentityKey,
    pub(crate) signed_prekey_id: u32,
    pub(crate) signed_prekey: DhPublic,
    pub(crate) signed_prekey_signature: [u8; 64],
    pub(crate) one_time_prekey: Option<(u32, DhPublic, [u8; 64])>,
    pub(crate) kem_prekey_id: u32,
    pub(crate) kem_one_time: bool,
    pub(crate) kem_prekey: Box<[u8; KEM_PUBLIC_LEN]>,
    pub(crate) kem_prekey_signature: [u8; 64],
}

impl std::fmt::Debug for PrekeyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrekeyBundle")
            .field("has_one_time_prekey", &self.one_time_prekey.is_some())
            .field("kem_one_time", &self.kem_one_time)
            .finish_non_exhaustive()
    }
}

impl PrekeyBundle {
    /// The device's identity.
    pub fn identity(&self) -> &IdentityKey {
        &self.identity
    }

    /// Whether the bundle carries a one-time X25519 prekey. Without one, an
    /// attacker who records the initial message can replay it; the responder
    /// refuses replays of initial messages it remembers (see `Device`).
    pub fn has_one_time_prekey(&self) -> bool {
        self.one_time_prekey.is_some()
    }

    /// The bundle's wire encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut writer = Writer::new(BUNDLE_TAG, BUNDLE_VERSION);
        writer
            .fixed(&self.identity.to_bytes())
            .u32(self.signed_prekey_id)
            .fixed(self.signed_prekey.as_bytes())
            .fixed(&self.signed_prekey_signature);
        match &self.one_time_prekey {
            Some((id, public, signature)) => writer
                .u8(1)
                .u32(*id)
                .fixed(public.as_bytes())
                .fixed(signature),
            None => writer.u8(0),
        };
        writer
            .u32(self.kem_prekey_id)
            .u8(u8::from(self.kem_one_time))
            .fixed(&self.kem_prekey[..])
            .fixed(&self.kem_prekey_signature);
        writer.finish()
    }

    /// Parses a bundle and verifies every signature in it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VerifyError> {
        let mut reader = Reader::new(bytes, BUNDLE_TAG, BUNDLE_VERSION)?;
        let identity = IdentityKey::from_bytes(&reader.array::<IDENTITY_KEY_LEN>()?)?;
        let signed_prekey_id = reader.u32()?;
        let signed_prekey = DhPublic::from(reader.array::<32>()?);
        let signed_prekey_signature = reader.array::<64>()?;
        let one_time_prekey = match reader.u8()? {
            0 => None,
            1 => Some((
                reader.u32()?,
                DhPublic::from(reader.array::<32>()?),
                reader.array::<64>()?,
            )),
            _ => return Err(DecodeError::Invalid("one-time prekey flag").into()),
        };
        let kem_prekey_id = reader.u32()?;
        let kem_one_time = match reader.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("post-quantum prekey kind").into()),
        };
        let kem_prekey = Box::new(reader.array::<KEM_PUBLIC_LEN>()?);
        let kem_prekey_signature = reader.array::<64>()?;
        reader.finish()?;
        identity
            .verify(
                &signed_prekey_payload(signed_prekey_id, &signed_prekey),
                &signed_prekey_signature,
            )
            .map_err(|()| VerifyError::SignedPrekeySignature)?;
        if let Some((id, public, signature)) = &one_time_prekey {
            identity
                .verify(&one_time_prekey_payload(*id, public), signature)
                .map_err(|()| VerifyError::OneTimePrekeySignature)?;
        }
        identity
            .verify(
                &kem_prekey_payload(kem_prekey_id, kem_one_time, &kem_prekey),
                &kem_prekey_signature,
            )
            .map_err(|()| VerifyError::KemPrekeySignature)?;
        ml_kem_768::EncapsulationKey::new_from_slice(&kem_prekey[..])
            .map_err(|_| VerifyError::Malformed(DecodeError::Invalid("post-quantum prekey")))?;
        Ok(Self {
            identity,
            signed_prekey_id,
            signed_prekey,
            signed_prekey_signature,
            one_time_prekey,
            kem_prekey_id,
            kem_one_time,
            kem_prekey,
            kem_prekey_signature,
        })
    }
}

/// A public prekey as published to the relay: id, public key, signature by the
/// device identity. For ML-KEM prekeys, `one_time` tells one-time from last resort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicPrekey {
    /// The prekey's id within its device.
    pub id: u32,
    /// For ML-KEM prekeys: one-time (true) or last resort (false). False for X25519 ones.
    pub one_time: bool,
    /// The public key (32 bytes for X25519, 1184 for ML-KEM-768).
    pub public_key: Vec<u8>,
    /// The device identity's signature.
    pub signature: [u8; 64],
}

/// Everything a device publishes to the relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedPrekeys {
    /// The device's identity, encoded.
    pub identity: [u8; IDENTITY_KEY_LEN],
    /// The current signed X25519 prekey.
    pub signed_prekey: PublicPrekey,
    /// The last-resort ML-KEM prekey.
    pub kem_last_resort: PublicPrekey,
    /// Unused one-time X25519 prekeys.
    pub one_time: Vec<PublicPrekey>,
    /// Unused one-time ML-KEM prekeys.
    pub kem_one_time: Vec<PublicPrekey>,
}

impl PrekeyBundle {
    /// Assembles a bundle from the parts a relay hands out, verifying every
    /// signature, exactly as [`PrekeyBundle::from_bytes`] does.
    pub fn from_parts(
        identity: &[u8],
        signed_prekey: &PublicPrekey,
        one_time_prekey: Option<&PublicPrekey>,
        kem_prekey: &PublicPrekey,
    ) -> Result<Self, VerifyError> {
        let identity: &[u8; IDENTITY_KEY_LEN] = identity
            .try_into()
            .map_err(|_| DecodeError::Invalid("identity length"))?;
        let mut writer = Writer::new(BUNDLE_TAG, BUNDLE_VERSION);
        writer.fixed(identity).u32(signed_prekey.id);
        let signed: [u8; 32] = signed_prekey
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| DecodeError::Invalid("signed prekey length"))?;
        writer.fixed(&signed).fixed(&signed_prekey.signature);
        match one_time_prekey {
            Some(prekey) => {
                let public: [u8; 32] = prekey
                    .public_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| DecodeError::Invalid("one-time prekey length"))?;
                writer
                    .u8(1)
                    .u32(prekey.id)
                    .fixed(&public)
                    .fixed(&prekey.signature);
            }
            None => {
                writer.u8(0);
            }
        }
        if kem_prekey.public_key.len() != KEM_PUBLIC_LEN {
            return Err(DecodeError::Invalid("post-quantum prekey length").into());
        }
        writer
            .u32(kem_prekey.id)
            .u8(u8::from(kem_prekey.one_time))
            .fixed(&kem_prekey.public_key)
            .fixed(&kem_prekey.signature);
        Self::from_bytes(&writer.finish())
    }
}
