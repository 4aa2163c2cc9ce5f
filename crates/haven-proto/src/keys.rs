//! Wire rules of the `Keys` service that device and relay compute alike: the
//! digest a device signs when it publishes prekeys, and the proof-of-work input
//! of an anonymous bundle claim.

use sha2::{Digest, Sha256};

use crate::v1::{KemPrekey, OneTimePrekey, PublishPrekeysRequest, SignedPrekey};

const UPLOAD_DOMAIN: &[u8] = b"haven.v1.prekey-upload";
const CLAIM_DOMAIN: &[u8] = b"haven.v1.bundle-claim";

fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

fn signed(hasher: &mut Sha256, prekey: Option<&SignedPrekey>) {
    match prekey {
        Some(prekey) => {
            hasher.update([1]);
            hasher.update(prekey.id.to_be_bytes());
            field(hasher, &prekey.public_key);
            field(hasher, &prekey.signature);
        }
        None => hasher.update([0]),
    }
}

fn one_time(hasher: &mut Sha256, prekey: &OneTimePrekey) {
    hasher.update(prekey.id.to_be_bytes());
    field(hasher, &prekey.public_key);
    field(hasher, &prekey.signature);
}

fn kem(hasher: &mut Sha256, prekey: Option<&KemPrekey>) {
    match prekey {
        Some(prekey) => {
            hasher.update([1]);
            hasher.update(prekey.id.to_be_bytes());
            hasher.update([u8::from(prekey.one_time)]);
            field(hasher, &prekey.public_key);
            field(hasher, &prekey.signature);
        }
        None => hasher.update([0]),
    }
}

/// The digest of everything a `PublishPrekeys` request uploads; the device signs
/// it as the request's one field, so the relay stores exactly what was signed.
pub fn upload_digest(request: &PublishPrekeysRequest) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(UPLOAD_DOMAIN);
    field(&mut hasher, &request.identity_key);
    signed(&mut hasher, request.signed_prekey.as_ref());
    kem(&mut hasher, request.kem_last_resort.as_ref());
    hasher.update((request.one_time_prekeys.len() as u64).to_be_bytes());
    for prekey in &request.one_time_prekeys {
        one_time(&mut hasher, prekey);
    }
    hasher.update((request.kem_one_time_prekeys.len() as u64).to_be_bytes());
    for prekey in &request.kem_one_time_prekeys {
        kem(&mut hasher, Some(prekey));
    }
    hasher.finalize().into()
}

/// The proof-of-work input of a bundle claim: the stamp is computed with
/// [`crate::pow`] over (supporter key, claim nonce, this), binding the stamp to
/// one supporter, one claim and its time.
pub fn claim_stamp_input(timestamp_ms: u64) -> Vec<u8> {
    [CLAIM_DOMAIN, &timestamp_ms.to_be_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> PublishPrekeysRequest {
        PublishPrekeysRequest {
            identity_key: vec![1; 128],
            signed_prekey: Some(SignedPrekey {
                id: 1,
                public_key: vec![2; 32],
                signature: vec![3; 64],
            }),
            kem_last_resort: Some(KemPrekey {
                id: 2,
                one_time: false,
                public_key: vec![4; 1184],
                signature: vec![5; 64],
            }),
            one_time_prekeys: vec![OneTimePrekey {
                id: 3,
                public_key: vec![6; 32],
                signature: vec![7; 64],
            }],
            kem_one_time_prekeys: vec![],
            auth: None,
            supporter_key: vec![8; 32],
        }
    }

    #[test]
    fn every_uploaded_field_changes_the_digest() {
        let base = upload_digest(&request());
        // The supporter key only names the list the relay looks in.
        let mut named = request();
        named.supporter_key = vec![9; 32];
        assert_eq!(upload_digest(&named), base);
        let mut changed = request();
        changed.one_time_prekeys[0].id = 4;
        assert_ne!(upload_digest(&changed), base);
        let mut changed = request();
        changed.kem_last_resort = None;
        assert_ne!(upload_digest(&changed), base);
        let mut changed = request();
        changed.one_time_prekeys.clear();
        changed.kem_one_time_prekeys.push(KemPrekey {
            id: 3,
            one_time: true,
            public_key: vec![6; 32],
            signature: vec![7; 64],
        });
        assert_ne!(upload_digest(&changed), base);
        // The auth field itself is not part of what is signed.
        let mut changed = request();
        changed.auth = Some(crate::v1::Auth::default());
        assert_eq!(upload_digest(&changed), base);
    }
}
