//! Device identity: an Ed25519 signing key, and an X25519 key it signs.
//!
//! Signal's X3DH/PQXDH use one X25519 key for both agreement and (XEdDSA)
//! signatures. Haven keeps the two apart — Ed25519 from ed25519-dalek for
//! signatures, X25519 for agreement — and binds them with a signature by the
//! Ed25519 key over the X25519 key, so neither primitive is used outside its
//! own specification.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRng;
use x25519_dalek::{PublicKey as DhPublic, StaticSecret};

use crate::VerifyError;

/// Domain of the identity's signature over its X25519 key.
const IDENTITY_DH_DOMAIN: &[u8] = b"Haven_IdentityDH_v1";

/// Encoded length of an [`IdentityKey`]: signing key, X25519 key, signature.
pub const IDENTITY_KEY_LEN: usize = 32 + 32 + 64;

/// A device's public identity: what others pin and compare.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdentityKey {
    signing: VerifyingKey,
    dh: DhPublic,
    dh_signature: [u8; 64],
}

/// Public keys are not secret, but they identify people: keep them out of logs.
impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityKey(..)")
    }
}

impl IdentityKey {
    /// The Ed25519 key that signs this device's prekeys.
    pub fn signing_key(&self) -> &VerifyingKey {
        &self.signing
    }

    /// The X25519 key used in key agreement.
    pub fn dh_key(&self) -> &DhPublic {
        &self.dh
    }

    /// The 128-byte encoding: signing key ‖ X25519 key ‖ signature.
    pub fn to_bytes(&self) -> [u8; IDENTITY_KEY_LEN] {
        let mut out = [0u8; IDENTITY_KEY_LEN];
        out[..32].copy_from_slice(self.signing.as_bytes());
        out[32..64].copy_from_slice(self.dh.as_bytes());
        out[64..].copy_from_slice(&self.dh_signature);
        out
    }

    /// Parses and verifies an identity: the signing key must be a valid, non-weak
    /// Ed25519 key and its signature over the X25519 key must verify.
    pub fn from_bytes(bytes: &[u8; IDENTITY_KEY_LEN]) -> Result<Self, VerifyError> {
        let mut signing = [0u8; 32];
        signing.copy_from_slice(&bytes[..32]);
        let mut dh = [0u8; 32];
        dh.copy_from_slice(&bytes[32..64]);
        let mut dh_signature = [0u8; 64];
        dh_signature.copy_from_slice(&bytes[64..]);
        let signing =
            VerifyingKey::from_bytes(&signing).map_err(|_| VerifyError::IdentitySignature)?;
        if signing.is_weak() {
            return Err(VerifyError::IdentitySignature);
        }
        let identity = Self {
            signing,
            dh: DhPublic::from(dh),
            dh_signature,
        };
        identity
            .verify(&identity_dh_payload(identity.dh.as_bytes()), &dh_signature)
            .map_err(|_| VerifyError::IdentitySignature)?;
        Ok(identity)
    }

    /// Verifies a signature by this identity over `payload`.
    pub(crate) fn verify(&self, payload: &[u8], signature: &[u8; 64]) -> Result<(), ()> {
        self.signing
            .verify_strict(payload, &Signature::from_bytes(signature))
            .map_err(|_| ())
    }
}

fn identity_dh_payload(dh: &[u8; 32]) -> Vec<u8> {
    [IDENTITY_DH_DOMAIN, dh].concat()
}

/// A device's identity secrets. Zeroized on drop (by dalek); no `Debug`, no `Clone`.
pub struct IdentityKeyPair {
    signing: SigningKey,
    dh: StaticSecret,
    public: IdentityKey,
}

impl IdentityKeyPair {
    /// A fresh identity.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let signing = SigningKey::generate(rng);
        let dh = StaticSecret::random_from_rng(rng);
        Self::from_parts(signing, dh)
    }

    pub(crate) fn from_parts(signing: SigningKey, dh: StaticSecret) -> Self {
        let dh_public = DhPublic::from(&dh);
        let dh_signature = signing
            .sign(&identity_dh_payload(dh_public.as_bytes()))
            .to_bytes();
        let public = IdentityKey {
            signing: signing.verifying_key(),
            dh: dh_public,
            dh_signature,
        };
        Self {
            signing,
            dh,
            public,
        }
    }

    /// The public identity.
    pub fn public(&self) -> &IdentityKey {
        &self.public
    }

    /// Signs a relay request payload (as `haven_proto::auth::request_payload`
    /// builds it) with the identity key, for the relay's `Keys` service. Refuses
    /// anything else, so the identity key can never be made to sign a prekey or
    /// another protocol message through this door: relay payloads start with the
    /// length-prefixed domain `haven.v1.request-auth`, which no protocol payload does.
    pub fn sign_relay_request(&self, payload: &[u8]) -> Option<[u8; 64]> {
        const RELAY_DOMAIN: &[u8] = b"\0\0\0\x15haven.v1.request-auth";
        payload
            .starts_with(RELAY_DOMAIN)
            .then(|| self.sign(payload))
    }

    pub(crate) fn sign(&self, payload: &[u8]) -> [u8; 64] {
        self.signing.sign(payload).to_bytes()
    }

    pub(crate) fn dh_secret(&self) -> &StaticSecret {
        &self.dh
    }

    /// The two secret scalars (Ed25519 seed ‖ X25519 scalar), for the SDK's
    /// sealed storage and snapshots only.
    pub fn secret_bytes(&self) -> zeroize::Zeroizing<[u8; 64]> {
        let mut out = zeroize::Zeroizing::new([0u8; 64]);
        out[..32].copy_from_slice(&self.signing.to_bytes());
        out[32..].copy_from_slice(self.dh.as_bytes());
        out
    }

    /// Restores an identity from [`IdentityKeyPair::secret_bytes`].
    pub fn from_secret_bytes(bytes: &[u8; 64]) -> Self {
        let mut signing = zeroize::Zeroizing::new([0u8; 32]);
        signing.copy_from_slice(&bytes[..32]);
        let mut dh = zeroize::Zeroizing::new([0u8; 32]);
        dh.copy_from_slice(&bytes[32..]);
        Self::from_parts(SigningKey::from_bytes(&signing), StaticSecret::from(*dh))
    }
}
