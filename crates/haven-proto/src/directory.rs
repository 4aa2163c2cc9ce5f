//! Directory documents: what signs what, and verification against a pinned key.
//!
//! The association's offline Ed25519 key signs [`SupporterEntry`]s and
//! [`Revocation`]s; a supporter's own key signs its [`DeviceList`]. A signature
//! covers a domain string naming the document kind, then the body bytes exactly
//! as they travel, so a signature for one kind never passes as another and no
//! re-encoding has to match. The relay verifies on publish (against the key in
//! its configuration) and clients verify again against the key they pin: the
//! relay cannot add or alter a supporter.
//!
//! [`SupporterEntry`]: crate::v1::SupporterEntry
//! [`DeviceList`]: crate::v1::DeviceList
//! [`Revocation`]: crate::v1::Revocation

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer, SigningKey};
use prost::Message as _;

use crate::v1::{DeviceList, Revocation, SignedDocument, SupporterEntry};

/// The prefix of a shareable supporter link (`haven:supporter:1:` then the
/// signed entry in unpadded URL-safe base64); it fits a QR code.
pub const LINK_PREFIX: &str = "haven:supporter:1:";
/// Longest link accepted; an entry is a few hundred bytes.
const MAX_LINK_LEN: usize = 4096;
/// Bounds on what an entry may carry, so a directory stays small and printable.
const MAX_TEXT_LEN: usize = 200;
const MAX_LANGUAGES: usize = 16;
/// Most devices one supporter may list.
pub const MAX_DEVICES: usize = 16;
/// Length of a device identity as `haven_protocol::IdentityKey` encodes it.
pub const DEVICE_IDENTITY_LEN: usize = 128;

/// The kinds of directory document, each with its own signing domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocumentKind {
    /// Signed by the association.
    SupporterEntry,
    /// Signed by the supporter.
    DeviceList,
    /// Signed by the association.
    Revocation,
}

impl DocumentKind {
    fn domain(self) -> &'static [u8] {
        match self {
            DocumentKind::SupporterEntry => b"haven.v1.directory.supporter-entry",
            DocumentKind::DeviceList => b"haven.v1.directory.device-list",
            DocumentKind::Revocation => b"haven.v1.directory.revocation",
        }
    }
}

/// Why a directory document was refused. Distinct variants let the SDK tell a
/// user (or a test) exactly what was wrong; none carries key bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The document does not parse, or a field is out of bounds.
    #[error("directory document is malformed: {0}")]
    Malformed(&'static str),
    /// The signature is not by the expected key (not the pinned association,
    /// or not the supporter), or the document was altered.
    #[error("directory document signature does not verify")]
    BadSignature,
    /// The document's validity has ended.
    #[error("directory document expired at {valid_until}; it is now {now}")]
    Expired {
        /// When it stopped being valid (Unix seconds).
        valid_until: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The association has revoked this supporter.
    #[error("supporter has been revoked")]
    Revoked,
    /// A device list older than one already seen.
    #[error("device list version {found} is older than version {known} already seen")]
    RolledBack {
        /// The newest version seen before.
        known: u64,
        /// The version offered.
        found: u64,
    },
    /// A device list with the version of one already seen but other contents:
    /// two lists under one version, shown to different clients.
    #[error("device list version {version} differs from the one already seen under that version")]
    Equivocated {
        /// The version both claim.
        version: u64,
    },
    /// A device list signed for a different supporter.
    #[error("device list belongs to another supporter")]
    WrongSupporter,
    /// Text that is not a Haven supporter link.
    #[error("not a Haven supporter link")]
    BadLink,
}

/// The bytes signed for a document of `kind` with `body`.
pub fn signing_payload(kind: DocumentKind, body: &[u8]) -> Vec<u8> {
    [kind.domain(), body].concat()
}

/// Signs an encoded body (used by the association's and supporter's tools).
pub fn sign(kind: DocumentKind, body: Vec<u8>, key: &SigningKey) -> SignedDocument {
    let signature = key.sign(&signing_payload(kind, &body)).to_bytes().to_vec();
    SignedDocument { body, signature }
}

fn verify_signature(
    kind: DocumentKind,
    document: &SignedDocument,
    key: &[u8],
) -> Result<(), DirectoryError> {
    crate::auth::verify(
        key,
        &signing_payload(kind, &document.body),
        &document.signature,
    )
    .map_err(|_| DirectoryError::BadSignature)
}

fn check_text(text: &str, field: &'static str, required: bool) -> Result<(), DirectoryError> {
    if (required && text.trim().is_empty())
        || text.chars().count() > MAX_TEXT_LEN
        || text.chars().any(char::is_control)
    {
        return Err(DirectoryError::Malformed(field));
    }
    Ok(())
}

fn check_key(key: &[u8], field: &'static str) -> Result<(), DirectoryError> {
    crate::auth::public_key(key)
        .map(|_| ())
        .map_err(|_| DirectoryError::Malformed(field))
}

fn check_fresh(valid_until: u64, now: u64) -> Result<(), DirectoryError> {
    if valid_until <= now {
        return Err(DirectoryError::Expired { valid_until, now });
    }
    Ok(())
}

/// Verifies a supporter entry against the pinned association key at `now`, and
/// against the revocations the verifier holds (already verified).
pub fn verify_supporter_entry(
    document: &SignedDocument,
    association_key: &[u8; 32],
    now: u64,
    revocations: &[Revocation],
) -> Result<SupporterEntry, DirectoryError> {
    verify_signature(DocumentKind::SupporterEntry, document, association_key)?;
    let entry = SupporterEntry::decode(document.body.as_slice())
        .map_err(|_| DirectoryError::Malformed("supporter entry"))?;
    check_key(&entry.supporter_key, "supporter_key")?;
    check_text(&entry.display_name, "display_name", true)?;
    check_text(&entry.specialty, "specialty", false)?;
    check_text(&entry.county, "county", false)?;
    check_text(&entry.town, "town", false)?;
    if entry.languages.len() > MAX_LANGUAGES {
        return Err(DirectoryError::Malformed("languages"));
    }
    for language in &entry.languages {
        check_text(language, "languages", true)?;
    }
    check_fresh(entry.valid_until, now)?;
    if revocations
        .iter()
        .any(|revocation| revocation.supporter_key == entry.supporter_key)
    {
        return Err(DirectoryError::Revoked);
    }
    Ok(entry)
}

/// Verifies a supporter's device list: signed by `supporter_key`, valid at
/// `now`, and not older than `known_version` (the newest the verifier has seen).
pub fn verify_device_list(
    document: &SignedDocument,
    supporter_key: &[u8; 32],
    now: u64,
    known_version: Option<u64>,
) -> Result<DeviceList, DirectoryError> {
    verify_signature(DocumentKind::DeviceList, document, supporter_key)?;
    let list = DeviceList::decode(document.body.as_slice())
        .map_err(|_| DirectoryError::Malformed("device list"))?;
    if list.supporter_key != supporter_key {
        return Err(DirectoryError::WrongSupporter);
    }
    if list.devices.is_empty() || list.devices.len() > MAX_DEVICES {
        return Err(DirectoryError::Malformed("devices"));
    }
    for (index, device) in list.devices.iter().enumerate() {
        if device.identity_key.len() != DEVICE_IDENTITY_LEN
            || device.intake_sender_id.len() != crate::MAILBOX_ID_LEN
        {
            return Err(DirectoryError::Malformed("device entry"));
        }
        if list.devices[..index]
            .iter()
            .any(|earlier| earlier.identity_key == device.identity_key)
        {
            return Err(DirectoryError::Malformed("repeated device"));
        }
    }
    if let Some(known) = known_version
        && list.version < known
    {
        return Err(DirectoryError::RolledBack {
            known,
            found: list.version,
        });
    }
    check_fresh(list.valid_until, now)?;
    Ok(list)
}

/// Verifies a revocation against the pinned association key.
pub fn verify_revocation(
    document: &SignedDocument,
    association_key: &[u8; 32],
) -> Result<Revocation, DirectoryError> {
    verify_signature(DocumentKind::Revocation, document, association_key)?;
    let revocation = Revocation::decode(document.body.as_slice())
        .map_err(|_| DirectoryError::Malformed("revocation"))?;
    check_key(&revocation.supporter_key, "supporter_key")?;
    Ok(revocation)
}

/// A link (or QR payload) that carries a signed supporter entry.
pub fn supporter_link(document: &SignedDocument) -> String {
    format!(
        "{LINK_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(document.encode_to_vec())
    )
}

/// Reads the signed entry out of a link; the caller still verifies it. Accepts
/// the bare payload or any text that ends with it (e.g. a web address whose
/// fragment is the payload).
pub fn parse_supporter_link(text: &str) -> Result<SignedDocument, DirectoryError> {
    let text = text.trim();
    if text.len() > MAX_LINK_LEN {
        return Err(DirectoryError::BadLink);
    }
    let start = text.rfind(LINK_PREFIX).ok_or(DirectoryError::BadLink)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(&text[start + LINK_PREFIX.len()..])
        .map_err(|_| DirectoryError::BadLink)?;
    let document = SignedDocument::decode(bytes.as_slice()).map_err(|_| DirectoryError::BadLink)?;
    if document.body.is_empty() || document.signature.len() != crate::SIGNATURE_LEN {
        return Err(DirectoryError::BadLink);
    }
    Ok(document)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::DeviceEntry;

    const NOW: u64 = 1_800_000_000;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn entry(supporter: &SigningKey) -> SupporterEntry {
        SupporterEntry {
            supporter_key: supporter.verifying_key().to_bytes().to_vec(),
            display_name: "Kari Nordmann".into(),
            specialty: "general practice".into(),
            county: "Vestland".into(),
            town: "Bergen".into(),
            languages: vec!["nb".into(), "en".into()],
            valid_until: NOW + 365 * 24 * 3600,
        }
    }

    fn device_list(supporter: &SigningKey, version: u64) -> DeviceList {
        DeviceList {
            supporter_key: supporter.verifying_key().to_bytes().to_vec(),
            version,
            devices: vec![
                DeviceEntry {
                    identity_key: vec![1; 128],
                    intake_sender_id: vec![2; 16],
                },
                DeviceEntry {
                    identity_key: vec![3; 128],
                    intake_sender_id: vec![4; 16],
                },
            ],
            valid_until: NOW + 30 * 24 * 3600,
        }
    }

    #[test]
    fn a_signed_entry_verifies_and_its_link_roundtrips_compactly() {
        let association = key(1);
        let supporter = key(2);
        let document = sign(
            DocumentKind::SupporterEntry,
            entry(&supporter).encode_to_vec(),
            &association,
        );
        let pinned = association.verifying_key().to_bytes();
        assert_eq!(
            verify_supporter_entry(&document, &pinned, NOW, &[]),
            Ok(entry(&supporter))
        );
        let link = supporter_link(&document);
        assert!(
            link.len() < 400,
            "a QR code should hold it easily: {} chars",
            link.len()
        );
        let shared = format!("https://haven.example/s#{link}");
        assert_eq!(parse_supporter_link(&shared), Ok(document));
    }

    #[test]
    fn entries_by_another_key_altered_expired_or_revoked_are_refused() {
        let association = key(1);
        let pinned = association.verifying_key().to_bytes();
        let supporter = key(2);
        let body = entry(&supporter).encode_to_vec();
        let by_impostor = sign(DocumentKind::SupporterEntry, body.clone(), &key(9));
        assert_eq!(
            verify_supporter_entry(&by_impostor, &pinned, NOW, &[]),
            Err(DirectoryError::BadSignature)
        );
        let mut altered = sign(DocumentKind::SupporterEntry, body.clone(), &association);
        altered.body[5] ^= 1;
        assert_eq!(
            verify_supporter_entry(&altered, &pinned, NOW, &[]),
            Err(DirectoryError::BadSignature)
        );
        // A signature for another kind of document does not carry over.
        let as_revocation = sign(DocumentKind::Revocation, body.clone(), &association);
        assert_eq!(
            verify_supporter_entry(&as_revocation, &pinned, NOW, &[]),
            Err(DirectoryError::BadSignature)
        );
        let document = sign(DocumentKind::SupporterEntry, body, &association);
        let later = NOW + 400 * 24 * 3600;
        assert!(matches!(
            verify_supporter_entry(&document, &pinned, later, &[]),
            Err(DirectoryError::Expired { now, .. }) if now == later
        ));
        let revocation = Revocation {
            supporter_key: supporter.verifying_key().to_bytes().to_vec(),
            revoked_at: NOW,
        };
        let revocation_document = sign(
            DocumentKind::Revocation,
            revocation.encode_to_vec(),
            &association,
        );
        let verified = verify_revocation(&revocation_document, &pinned);
        assert_eq!(verified.as_ref(), Ok(&revocation));
        assert_eq!(
            verify_supporter_entry(&document, &pinned, NOW, &[revocation]),
            Err(DirectoryError::Revoked)
        );
        assert_eq!(
            verify_revocation(&revocation_document, &key(9).verifying_key().to_bytes()),
            Err(DirectoryError::BadSignature)
        );
    }

    #[test]
    fn malformed_entries_are_refused() {
        let association = key(1);
        let pinned = association.verifying_key().to_bytes();
        let mut nameless = entry(&key(2));
        nameless.display_name = " ".into();
        let mut weak_key = entry(&key(2));
        weak_key.supporter_key = vec![0; 32];
        let mut control = entry(&key(2));
        control.town = "Bergen\u{7}".into();
        for (bad, field) in [
            (nameless, "display_name"),
            (weak_key, "supporter_key"),
            (control, "town"),
        ] {
            let document = sign(
                DocumentKind::SupporterEntry,
                bad.encode_to_vec(),
                &association,
            );
            assert_eq!(
                verify_supporter_entry(&document, &pinned, NOW, &[]),
                Err(DirectoryError::Malformed(field))
            );
        }
    }

    #[test]
    fn device_lists_are_bound_to_their_supporter_and_never_roll_back() {
        let supporter = key(2);
        let supporter_key = supporter.verifying_key().to_bytes();
        let v2 = sign(
            DocumentKind::DeviceList,
            device_list(&supporter, 2).encode_to_vec(),
            &supporter,
        );
        assert_eq!(
            verify_device_list(&v2, &supporter_key, NOW, Some(2)),
            Ok(device_list(&supporter, 2))
        );
        assert_eq!(
            verify_device_list(&v2, &supporter_key, NOW, Some(3)),
            Err(DirectoryError::RolledBack { known: 3, found: 2 })
        );
        // Signed by someone else, or naming another supporter inside.
        let other = key(3);
        let forged = sign(
            DocumentKind::DeviceList,
            device_list(&supporter, 5).encode_to_vec(),
            &other,
        );
        assert_eq!(
            verify_device_list(&forged, &supporter_key, NOW, None),
            Err(DirectoryError::BadSignature)
        );
        let theirs = sign(
            DocumentKind::DeviceList,
            device_list(&other, 5).encode_to_vec(),
            &supporter,
        );
        assert_eq!(
            verify_device_list(&theirs, &supporter_key, NOW, None),
            Err(DirectoryError::WrongSupporter)
        );
        let mut repeated = device_list(&supporter, 6);
        repeated.devices[1].identity_key = vec![1; 128];
        let repeated = sign(
            DocumentKind::DeviceList,
            repeated.encode_to_vec(),
            &supporter,
        );
        assert_eq!(
            verify_device_list(&repeated, &supporter_key, NOW, None),
            Err(DirectoryError::Malformed("repeated device"))
        );
        assert!(matches!(
            verify_device_list(&v2, &supporter_key, NOW + 31 * 24 * 3600, None),
            Err(DirectoryError::Expired { .. })
        ));
    }

    #[test]
    fn links_that_are_not_ours_are_refused() {
        for text in [
            "",
            "haven:supporter:1:",
            "haven:supporter:1:!!!",
            "https://example.org",
            "haven:supporter:2:AAAA",
        ] {
            assert!(parse_supporter_link(text).is_err(), "{text:?}");
        }
        assert_eq!(
            parse_supporter_link(&"a".repeat(5000)),
            Err(DirectoryError::BadLink)
        );
    }

    proptest::proptest! {
        #[test]
        fn verification_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                     signature in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let document = SignedDocument { body, signature };
            let _ = verify_supporter_entry(&document, &[7; 32], NOW, &[]);
            let _ = verify_device_list(&document, &[7; 32], NOW, Some(1));
            let _ = verify_revocation(&document, &[7; 32]);
        }

        #[test]
        fn link_parsing_never_panics(text in ".{0,600}") {
            let _ = parse_supporter_link(&text);
        }
    }
}
