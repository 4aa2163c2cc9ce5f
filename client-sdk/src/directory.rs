//! Browsing the supporter directory, verified on this device against the pinned
//! association key: the relay cannot add, alter or resurrect a supporter.

use haven_proto::directory::{
    DirectoryError, parse_supporter_link, verify_device_list, verify_revocation,
    verify_supporter_entry,
};
use haven_proto::v1 as proto;
use haven_protocol::IdentityKey;
use sha2::{Digest as _, Sha256};

use crate::storage::Tree;
use crate::transport::Lane;
use crate::{Client, Error};

/// A supporter as the directory shows them, every signature checked. It can
/// only come out of verification (review 2026-12-crypto #16): no public fields
/// or constructor, so an app cannot build, cache or deserialize one and start a
/// conversation to devices nobody signed.
#[derive(Clone, PartialEq, Eq)]
pub struct Supporter {
    pub(crate) key: [u8; 32],
    pub(crate) display_name: String,
    pub(crate) specialty: String,
    pub(crate) county: String,
    pub(crate) town: String,
    pub(crate) languages: Vec<String>,
    pub(crate) taking_new_conversations: bool,
    pub(crate) devices: Vec<SupporterDevice>,
}

impl Supporter {
    /// The supporter's key (identifies them to the SDK).
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// Name shown to the help-seeker.
    pub fn display_name(&self) -> &str {
        &self.display_name
    }

    /// Medical specialty.
    pub fn specialty(&self) -> &str {
        &self.specialty
    }

    /// County.
    pub fn county(&self) -> &str {
        &self.county
    }

    /// Town.
    pub fn town(&self) -> &str {
        &self.town
    }

    /// Languages they talk in.
    pub fn languages(&self) -> &[String] {
        &self.languages
    }

    /// Whether they take new conversations now (from the relay; unsigned).
    pub fn taking_new_conversations(&self) -> bool {
        self.taking_new_conversations
    }

    /// Their devices, from their signed device list (empty until they register one).
    pub fn devices(&self) -> &[SupporterDevice] {
        &self.devices
    }
}

/// Directory entries are not secret, but which supporter a user looks at is.
impl std::fmt::Debug for Supporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Supporter(..)")
    }
}

/// One of a supporter's devices, from their verified device list.
#[derive(Clone, PartialEq, Eq)]
pub struct SupporterDevice {
    pub(crate) identity: IdentityKey,
    pub(crate) intake_sender_id: [u8; 16],
}

impl SupporterDevice {
    /// The device's verified identity.
    pub fn identity(&self) -> &IdentityKey {
        &self.identity
    }

    /// The sender id of the device's intake mailbox.
    pub fn intake_sender_id(&self) -> [u8; 16] {
        self.intake_sender_id
    }
}

/// Filters for [`Client::list_supporters`]; `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct DirectoryFilter {
    /// Only this specialty.
    pub specialty: Option<String>,
    /// Only this county.
    pub county: Option<String>,
    /// Only supporters who speak this language.
    pub language: Option<String>,
    /// Only supporters taking new conversations.
    pub taking_new_conversations_only: bool,
}

fn known_version_key(supporter: &[u8; 32]) -> Vec<u8> {
    [&b"device-list-version/"[..], supporter].concat()
}

impl Client {
    /// Verifies one listing: the entry against the pinned key (and the verified
    /// revocations), the device list against the supporter key and the newest
    /// version this device has seen (which it then remembers).
    fn verified(
        &self,
        listing: &proto::DirectoryListing,
        revocations: &[proto::Revocation],
    ) -> Result<Supporter, Error> {
        let entry_document = listing
            .entry
            .as_ref()
            .ok_or(DirectoryError::Malformed("listing without entry"))?;
        let entry = verify_supporter_entry(
            entry_document,
            &self.config.association_key,
            self.now(),
            revocations,
        )?;
        let key: [u8; 32] = entry
            .supporter_key
            .as_slice()
            .try_into()
            .map_err(|_| DirectoryError::Malformed("supporter_key"))?;
        let mut devices = Vec::new();
        if let Some(document) = &listing.device_list {
            // The newest version seen, and a digest of its body: an older
            // version is a rollback, the same version with other contents is
            // equivocation (review 2026-12-crypto #8). Both are refused.
            let version_key = known_version_key(&key);
            let remembered = self.store.get_versioned(
                crate::storage::Owner::Device,
                Tree::State,
                &version_key,
            )?;
            let known = remembered
                .as_ref()
                .and_then(|bytes| bytes.get(..8))
                .and_then(|bytes| bytes.try_into().ok().map(u64::from_be_bytes));
            let list = verify_device_list(document, &key, self.now(), known)?;
            let digest: [u8; 32] = Sha256::digest(&document.body).into();
            if known == Some(list.version)
                && remembered
                    .as_ref()
                    .and_then(|bytes| bytes.get(8..))
                    .is_some_and(|seen| seen != digest)
            {
                return Err(DirectoryError::Equivocated {
                    version: list.version,
                }
                .into());
            }
            if known.is_none_or(|known| list.version > known) {
                let record = [&list.version.to_be_bytes()[..], &digest].concat();
                self.store.put_versioned(
                    crate::storage::Owner::Device,
                    Tree::State,
                    &version_key,
                    &record,
                )?;
            }
            for device in &list.devices {
                let identity: &[u8; haven_protocol::IDENTITY_KEY_LEN] = device
                    .identity_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::BadDeviceIdentity)?;
                let intake_sender_id: [u8; 16] = device
                    .intake_sender_id
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::BadDeviceIdentity)?;
                devices.push(SupporterDevice {
                    identity: IdentityKey::from_bytes(identity)
                        .map_err(|_| Error::BadDeviceIdentity)?,
                    intake_sender_id,
                });
            }
        }
        Ok(Supporter {
            key,
            display_name: entry.display_name,
            specialty: entry.specialty,
            county: entry.county,
            town: entry.town,
            languages: entry.languages,
            taking_new_conversations: listing.taking_new_conversations,
            devices,
        })
    }

    fn verified_revocations(&self, documents: &[proto::SignedDocument]) -> Vec<proto::Revocation> {
        // A revocation that does not verify is simply not one.
        documents
            .iter()
            .filter_map(|document| verify_revocation(document, &self.config.association_key).ok())
            .collect()
    }

    /// The directory, filtered, with every document verified on this device.
    /// Entries that fail verification are left out (a relay cannot add one).
    pub async fn list_supporters(&self, filter: &DirectoryFilter) -> Result<Vec<Supporter>, Error> {
        let request = proto::ListRequest {
            specialty: filter.specialty.clone().unwrap_or_default(),
            county: filter.county.clone().unwrap_or_default(),
            language: filter.language.clone().unwrap_or_default(),
            taking_new_conversations_only: filter.taking_new_conversations_only,
        };
        let response = self
            .transport
            .directory(Lane::Directory)
            .list(request)
            .await?
            .into_inner();
        let revocations = self.verified_revocations(&response.revocations);
        let mut supporters = Vec::new();
        let mut refused = 0usize;
        for listing in &response.supporters {
            match self.verified(listing, &revocations) {
                Ok(supporter) => supporters.push(supporter),
                Err(_) => refused += 1,
            }
        }
        if refused > 0 {
            tracing::warn!(
                refused,
                "directory entries that do not verify were left out"
            );
        }
        Ok(supporters)
    }

    /// One supporter, verified; the distinct [`DirectoryError`]s say why one is refused.
    pub async fn supporter(&self, key: &[u8; 32]) -> Result<Supporter, Error> {
        let listing = self
            .transport
            .directory(Lane::Directory)
            .get(proto::GetRequest {
                supporter_key: key.to_vec(),
            })
            .await?
            .into_inner();
        let revocations = self
            .transport
            .directory(Lane::Directory)
            .list(proto::ListRequest::default())
            .await?
            .into_inner()
            .revocations;
        self.verified(&listing, &self.verified_revocations(&revocations))
    }

    /// The supporter behind a shared link or QR payload, verified offline
    /// against the pinned key (devices and availability come from
    /// [`Client::supporter`] with the returned key).
    pub fn supporter_from_link(&self, link: &str) -> Result<Supporter, Error> {
        let document = parse_supporter_link(link)?;
        let listing = proto::DirectoryListing {
            entry: Some(document),
            device_list: None,
            taking_new_conversations: false,
        };
        self.verified(&listing, &[])
    }
}
