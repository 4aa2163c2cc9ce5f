//! PQXDH key agreement, following Signal's PQXDH specification (revision 3):
//! X25519 for DH1..DH4, ML-KEM-768 as the post-quantum KEM, HKDF-SHA256 as KDF.
//!
//! ```text
//! DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)
//! DH4 = DH(EK_A, OPK_B)   (only when the bundle has a one-time prekey)
//! (CT, SS) = ML-KEM-768.Encaps(PQPK_B)
//! SK = HKDF(salt = 32 zero bytes, ikm = 0xFF*32 ‖ DH1 ‖ DH2 ‖ DH3 [‖ DH4] ‖ SS,
//!           info = "Haven_PQXDH_CURVE25519_SHA-256_ML-KEM-768" ‖ T)
//! T  = SHA-256(PQPK_B) ‖ CT ‖ EK_A ‖ id(SPK_B) ‖ [0 | 1 ‖ id(OPK_B)] ‖ id(PQPK_B)
//! AD = "Haven_PQXDH_AD_v1" ‖ IK_A ‖ IK_B   (both full 128-byte identities)
//! ```
//!
//! T is a deviation from revision 3 (review 2026-12-crypto #12): binding the
//! KEM public key, the KEM ciphertext, the base key and the prekey ids into the
//! key derivation, as the 2024 analyses (Bhargavan–Jacomme–Kiefer–Schmidt;
//! Fiedler–Günther) recommend, makes the handshake's security independent of
//! ML-KEM's binding properties and of which prekeys a relay chose. Ids are
//! 4-byte big-endian; every part has a fixed length, so T is unambiguous.
//!
//! The 32 0xFF bytes are the specification's domain separator for X25519. AD
//! binds both parties' whole identities (signing and agreement keys), since Haven
//! keeps the two apart (see `identity`).
//!
//! Without a one-time prekey, a recorded initial message can be replayed to the
//! responder (specification, section 4.2). The responder remembers the base keys
//! of initial messages it accepted and refuses them a second time (see `Device`),
//! and signed prekeys rotate weekly, which bounds how long a replay could work at all.

use rand_core::CryptoRng;
use sha2::{Digest as _, Sha256};
use x25519_dalek::{PublicKey as DhPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::codec::{Reader, Writer};
use crate::identity::{IDENTITY_KEY_LEN, IdentityKey, IdentityKeyPair};
use crate::kdf::{PQXDH_INFO, hkdf};
use crate::prekey::{KEM_CIPHERTEXT_LEN, PrekeyBundle, encapsulate};
use crate::{DecodeError, HandshakeError};

const AD_DOMAIN: &[u8] = b"Haven_PQXDH_AD_v1";
pub(crate) const INITIAL_TAG: u8 = 0x20;
/// Version 2: the key derivation binds the transcript T.
const INITIAL_VERSION: u8 = 2;
/// Bound on the ratchet message inside an initial message.
const MAX_INNER: usize = 64 * 1024;

/// What the initiator sends so the responder can complete the handshake.
#[derive(Clone)]
pub(crate) struct InitialHeader {
    pub(crate) initiator: IdentityKey,
    pub(crate) base_key: [u8; 32],
    pub(crate) signed_prekey_id: u32,
    pub(crate) one_time_prekey_id: Option<u32>,
    pub(crate) kem_prekey_id: u32,
    pub(crate) kem_ciphertext: Box<[u8; KEM_CIPHERTEXT_LEN]>,
}

impl InitialHeader {
    /// An initial message: this header around a ratchet message.
    pub(crate) fn wrap(&self, ratchet_message: &[u8]) -> Vec<u8> {
        let mut writer = Writer::new(INITIAL_TAG, INITIAL_VERSION);
        self.write(&mut writer);
        writer.var(ratchet_message);
        writer.finish()
    }

    pub(crate) fn write(&self, writer: &mut Writer) {
        writer
            .fixed(&self.initiator.to_bytes())
            .fixed(&self.base_key)
            .u32(self.signed_prekey_id);
        match self.one_time_prekey_id {
            Some(id) => writer.u8(1).u32(id),
            None => writer.u8(0),
        };
        writer
            .u32(self.kem_prekey_id)
            .fixed(&self.kem_ciphertext[..]);
    }

    pub(crate) fn read(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let identity = reader.array::<IDENTITY_KEY_LEN>()?;
        let initiator = IdentityKey::from_bytes(&identity)
            .map_err(|_| DecodeError::Invalid("initiator identity"))?;
        let base_key = reader.array::<32>()?;
        let signed_prekey_id = reader.u32()?;
        let one_time_prekey_id = match reader.u8()? {
            0 => None,
            1 => Some(reader.u32()?),
            _ => return Err(DecodeError::Invalid("one-time prekey flag")),
        };
        let kem_prekey_id = reader.u32()?;
        let kem_ciphertext = Box::new(reader.array::<KEM_CIPHERTEXT_LEN>()?);
        Ok(Self {
            initiator,
            base_key,
            signed_prekey_id,
            one_time_prekey_id,
            kem_prekey_id,
            kem_ciphertext,
        })
    }

    /// Parses an initial message into its header and inner ratchet message.
    pub(crate) fn unwrap(message: &[u8]) -> Result<(Self, &[u8]), DecodeError> {
        let mut reader = Reader::new(message, INITIAL_TAG, INITIAL_VERSION)?;
        let header = Self::read(&mut reader)?;
        let inner = reader.var(MAX_INNER)?;
        reader.finish()?;
        Ok((header, inner))
    }
}

/// The associated data of a session: both identities, initiator first.
pub(crate) fn associated_data(initiator: &IdentityKey, responder: &IdentityKey) -> Vec<u8> {
    [AD_DOMAIN, &initiator.to_bytes(), &responder.to_bytes()].concat()
}

fn dh(secret: &StaticSecret, public: &DhPublic) -> Result<Zeroizing<[u8; 32]>, HandshakeError> {
    let shared = secret.diffie_hellman(public);
    if !shared.was_contributory() {
        return Err(HandshakeError::NonContributory);
    }
    Ok(Zeroizing::new(*shared.as_bytes()))
}

/// T: what both sides know of the handshake beyond the shared secrets.
fn transcript(kem_public: &[u8], header: &InitialHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + KEM_CIPHERTEXT_LEN + 32 + 4 + 5 + 4);
    out.extend_from_slice(&Sha256::digest(kem_public));
    out.extend_from_slice(&header.kem_ciphertext[..]);
    out.extend_from_slice(&header.base_key);
    out.extend_from_slice(&header.signed_prekey_id.to_be_bytes());
    match header.one_time_prekey_id {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.to_be_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&header.kem_prekey_id.to_be_bytes());
    out
}

fn derive(parts: &[&[u8]], transcript: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * 6));
    ikm.extend_from_slice(&[0xFF; 32]);
    for part in parts {
        ikm.extend_from_slice(part);
    }
    let info = [PQXDH_INFO, transcript].concat();
    hkdf::<32>(&[0u8; 32], &ikm, &info)
}

/// The initiator's side: the shared key and the header to send.
pub(crate) fn initiate<R: CryptoRng + ?Sized>(
    initiator: &IdentityKeyPair,
    bundle: &PrekeyBundle,
    rng: &mut R,
) -> Result<(Zeroizing<[u8; 32]>, InitialHeader), HandshakeError> {
    let ephemeral = StaticSecret::random_from_rng(rng);
    let dh1 = dh(initiator.dh_secret(), &bundle.signed_prekey)?;
    let dh2 = dh(&ephemeral, bundle.identity.dh_key())?;
    let dh3 = dh(&ephemeral, &bundle.signed_prekey)?;
    let dh4 = match &bundle.one_time_prekey {
        Some((_, public, _)) => Some(dh(&ephemeral, public)?),
        None => None,
    };
    let (kem_ciphertext, kem_secret) = encapsulate(&bundle.kem_prekey, rng)?;
    let mut parts: Vec<&[u8]> = vec![&dh1[..], &dh2[..], &dh3[..]];
    if let Some(dh4) = &dh4 {
        parts.push(&dh4[..]);
    }
    parts.push(&kem_secret[..]);
    let header = InitialHeader {
        initiator: *initiator.public(),
        base_key: DhPublic::from(&ephemeral).to_bytes(),
        signed_prekey_id: bundle.signed_prekey_id,
        one_time_prekey_id: bundle.one_time_prekey.as_ref().map(|(id, _, _)| *id),
        kem_prekey_id: bundle.kem_prekey_id,
        kem_ciphertext,
    };
    let shared_key = derive(&parts, &transcript(&bundle.kem_prekey[..], &header));
    Ok((shared_key, header))
}

/// The responder's side, given the secrets the header names and the public
/// key of the KEM prekey it names.
pub(crate) fn respond(
    responder: &IdentityKeyPair,
    header: &InitialHeader,
    signed_prekey: &StaticSecret,
    one_time_prekey: Option<&StaticSecret>,
    kem_public: &[u8],
    kem_secret: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, HandshakeError> {
    let base_key = DhPublic::from(header.base_key);
    let dh1 = dh(signed_prekey, header.initiator.dh_key())?;
    let dh2 = dh(responder.dh_secret(), &base_key)?;
    let dh3 = dh(signed_prekey, &base_key)?;
    let dh4 = match one_time_prekey {
        Some(secret) => Some(dh(secret, &base_key)?),
        None => None,
    };
    let mut parts: Vec<&[u8]> = vec![&dh1[..], &dh2[..], &dh3[..]];
    if let Some(dh4) = &dh4 {
        parts.push(&dh4[..]);
    }
    parts.push(&kem_secret[..]);
    Ok(derive(&parts, &transcript(kem_public, header)))
}
