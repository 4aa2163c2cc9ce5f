//! Key derivation as the Signal specifications define it, with Haven's constants.
//!
//! Every info string names Haven, the step and the primitives, so keys derived
//! for one purpose can never be confused with another's, nor with another
//! protocol's that uses the same primitives.

use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// PQXDH's KDF info: application, curve, hash and KEM, as the PQXDH
/// specification (section 2.2) asks.
pub(crate) const PQXDH_INFO: &[u8] = b"Haven_PQXDH_CURVE25519_SHA-256_ML-KEM-768";
/// Double Ratchet KDF_RK info.
pub(crate) const RATCHET_ROOT_INFO: &[u8] = b"Haven_DoubleRatchet_RootChain_v1";
/// Double Ratchet message-key expansion info (key and nonce for ChaCha20-Poly1305).
pub(crate) const MESSAGE_KEY_INFO: &[u8] = b"Haven_DoubleRatchet_MessageKeys_ChaCha20Poly1305_v1";

/// HKDF-SHA256 into `N` bytes.
pub(crate) fn hkdf<const N: usize>(salt: &[u8], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; N]> {
    let mut out = Zeroizing::new([0u8; N]);
    // Expansion only fails for outputs over 255 * 32 bytes; every N here is small.
    let _ = Hkdf::<Sha256>::new(Some(salt), ikm).expand(info, &mut out[..]);
    out
}

/// KDF_RK(rk, dh_out): HKDF with the root key as salt; returns (root key, chain key).
pub(crate) fn kdf_rk(
    root_key: &[u8; 32],
    dh_out: &[u8; 32],
) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let okm = hkdf::<64>(root_key, dh_out, RATCHET_ROOT_INFO);
    split(&okm)
}

/// KDF_CK(ck): HMAC-SHA256 with the chain key, input 0x01 for the message key and
/// 0x02 for the next chain key (Double Ratchet specification, section 5.2).
pub(crate) fn kdf_ck(chain_key: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let message_key = hmac(chain_key, &[0x01]);
    let next_chain_key = hmac(chain_key, &[0x02]);
    (next_chain_key, message_key)
}

fn hmac(key: &[u8; 32], input: &[u8]) -> Zeroizing<[u8; 32]> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail here.
    let mut out = Zeroizing::new([0u8; 32]);
    if let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        mac.update(input);
        out.copy_from_slice(&mac.finalize().into_bytes());
    }
    out
}

pub(crate) fn split(okm: &[u8; 64]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut first = Zeroizing::new([0u8; 32]);
    let mut second = Zeroizing::new([0u8; 32]);
    first.copy_from_slice(&okm[..32]);
    second.copy_from_slice(&okm[32..]);
    (first, second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_wrapper_matches_rfc5869_test_case_1() {
        let salt: Vec<u8> = (0u8..=12).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let okm = hkdf::<42>(&salt, &[0x0b; 22], &info);
        assert_eq!(
            hex::encode(&okm[..]),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    #[test]
    fn chain_steps_are_distinct_and_deterministic() {
        let (next, message) = kdf_ck(&[7; 32]);
        assert_ne!(next[..], message[..]);
        assert_eq!(kdf_ck(&[7; 32]).0[..], next[..]);
        let (root, chain) = kdf_rk(&[1; 32], &[2; 32]);
        assert_ne!(root[..], chain[..]);
    }
}
