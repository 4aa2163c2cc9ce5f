//! Sealed sender: the outer layer of every envelope, sealed to the recipient
//! device so that the relay learns neither the sender nor the ratchet header.
//!
//! After Signal's sealed sender (v1): an ephemeral X25519 key agreed with the
//! recipient's identity key encrypts the sender's identity; a static-static
//! agreement between the sender's and recipient's identity keys, chained onto
//! the first, encrypts the content. Opening it therefore proves the sender holds
//! the identity it names.
//!
//! ```text
//! e = fresh X25519;  (chain, k1) = HKDF(salt = E ‖ IK_R, ikm = DH(e, IK_R), info = I1)
//! c1 = ChaCha20-Poly1305(k1, nonce 0, sender identity, aad = prefix ‖ E)
//! k2 = HKDF(salt = chain, ikm = DH(IK_S, IK_R), info = I2 ‖ c1)
//! c2 = ChaCha20-Poly1305(k2, nonce 0, content, aad = prefix ‖ E ‖ c1)
//! sealed = 0x30 ‖ version 1 ‖ E ‖ c1 ‖ c2
//! ```
//!
//! Both keys are used for one message only, so the fixed nonce is safe. What the
//! relay can observe: the sealed length (content is padded before the ratchet),
//! the recipient mailbox, the time of arrival.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand_core::CryptoRng;
use x25519_dalek::{PublicKey as DhPublic, StaticSecret};
use zeroize::Zeroizing;

use crate::SealError;
use crate::codec::{Reader, Writer};
use crate::identity::{IDENTITY_KEY_LEN, IdentityKey, IdentityKeyPair};
use crate::kdf::{hkdf, split};

const SEALED_TAG: u8 = 0x30;
const SEALED_VERSION: u8 = 1;
const EPHEMERAL_INFO: &[u8] = b"Haven_SealedSender_Ephemeral_v1";
const STATIC_INFO: &[u8] = b"Haven_SealedSender_Static_v1";
const SENDER_LEN: usize = IDENTITY_KEY_LEN + 16;

fn agree(secret: &StaticSecret, public: &DhPublic) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let shared = secret.diffie_hellman(public);
    if !shared.was_contributory() {
        return Err(SealError::NonContributory);
    }
    Ok(Zeroizing::new(*shared.as_bytes()))
}

fn cipher(key: &[u8; 32]) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(&Key::from(*key))
}

fn ephemeral_keys(
    ephemeral_secret: &[u8; 32],
    ephemeral_public: &[u8; 32],
    recipient: &IdentityKey,
) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let salt = [&ephemeral_public[..], recipient.dh_key().as_bytes()].concat();
    split(&hkdf::<64>(&salt, ephemeral_secret, EPHEMERAL_INFO))
}

fn static_key(
    chain: &[u8; 32],
    static_secret: &[u8; 32],
    sealed_sender: &[u8],
) -> Zeroizing<[u8; 32]> {
    let info = [STATIC_INFO, sealed_sender].concat();
    hkdf::<32>(chain, static_secret, &info)
}

/// Seals `content` from `sender` to the device whose identity is `recipient`.
pub fn seal<R: CryptoRng + ?Sized>(
    sender: &IdentityKeyPair,
    recipient: &IdentityKey,
    content: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>, SealError> {
    let ephemeral = StaticSecret::random_from_rng(rng);
    let ephemeral_public = DhPublic::from(&ephemeral).to_bytes();
    let (chain, sender_key) = ephemeral_keys(
        &*agree(&ephemeral, recipient.dh_key())?,
        &ephemeral_public,
        recipient,
    );
    let mut writer = Writer::new(SEALED_TAG, SEALED_VERSION);
    writer.fixed(&ephemeral_public);
    let prefix = writer.finish();
    let sealed_sender = cipher(&sender_key)
        .encrypt(
            &Nonce::default(),
            Payload {
                msg: &sender.public().to_bytes(),
                aad: &prefix,
            },
        )
        .map_err(|_| SealError::Authentication)?;
    let content_key = static_key(
        &chain,
        &*agree(sender.dh_secret(), recipient.dh_key())?,
        &sealed_sender,
    );
    let mut out = prefix;
    out.extend_from_slice(&sealed_sender);
    let sealed_content = cipher(&content_key)
        .encrypt(
            &Nonce::default(),
            Payload {
                msg: content,
                aad: &out,
            },
        )
        .map_err(|_| SealError::Authentication)?;
    out.extend_from_slice(&sealed_content);
    Ok(out)
}

/// Opens an envelope sealed to `recipient`: the sender's verified identity and
/// the content.
pub fn open(
    recipient: &IdentityKeyPair,
    sealed: &[u8],
) -> Result<(IdentityKey, Zeroizing<Vec<u8>>), SealError> {
    let mut reader = Reader::new(sealed, SEALED_TAG, SEALED_VERSION)?;
    let ephemeral_public = reader.array::<32>()?;
    let sealed_sender = reader.take(SENDER_LEN)?;
    let sealed_content = reader.rest();
    let prefix_len = 2 + 32;
    let (chain, sender_key) = ephemeral_keys(
        &*agree(recipient.dh_secret(), &DhPublic::from(ephemeral_public))?,
        &ephemeral_public,
        recipient.public(),
    );
    let sender_bytes = Zeroizing::new(
        cipher(&sender_key)
            .decrypt(
                &Nonce::default(),
                Payload {
                    msg: sealed_sender,
                    aad: &sealed[..prefix_len],
                },
            )
            .map_err(|_| SealError::Authentication)?,
    );
    let sender_bytes: [u8; IDENTITY_KEY_LEN] = sender_bytes[..]
        .try_into()
        .map_err(|_| SealError::Authentication)?;
    let sender = IdentityKey::from_bytes(&sender_bytes).map_err(|_| SealError::BadSender)?;
    let content_key = static_key(
        &chain,
        &*agree(recipient.dh_secret(), sender.dh_key())?,
        sealed_sender,
    );
    let content = cipher(&content_key)
        .decrypt(
            &Nonce::default(),
            Payload {
                msg: sealed_content,
                aad: &sealed[..prefix_len + SENDER_LEN],
            },
        )
        .map_err(|_| SealError::Authentication)?;
    Ok((sender, Zeroizing::new(content)))
}
