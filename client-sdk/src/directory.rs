//! Browsing the supporter directory, verified on this device against the pinned
//! association key: the relay cannot add, alter or resurrect a supporter.

use haven_proto::directory::{
    DirectoryError, parse_supporter_link, verify_device_list, verify_revocation,
    verify_supporter_entry,
};
use haven_proto::v1 as proto;
use haven_protocol::IdentityKey;

use crate::storage::Tree;
use crate::{Client, Error};

/// A supporter as the directory shows them, every signature checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Supporter {
    /// The supporter's key (identifies them to the SDK).
    pub key: [u8; 32],
    /// Name shown to the help-seeker.
    pub display_name: String,
    /// Medical specialty.
    pub specialty: String,
    /// County.
    pub county: String,
    /// Town.
    pub town: String,
    /// Languages they talk in.
    pub languages: Vec<String>,
    /// Whether they take new conversations now (from the relay; unsigned).
    pub taking_new_conversations: bool,
    /// Their devices, from their signed device list (empty until they register one).
    pub devices: Vec<SupporterDevice>,
}

/// Directory entries are not secret, but which supporter a user looks at is.
impl std::fmt::Debug for Supporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Supporter(..)")
    }
}

/// One of a supporter's devices.
#[derive(Clone, PartialEq, Eq)]
pub struct SupporterDevice {
    /// The device's verified identity.
    pub identity: IdentityKey,
    /// The sender id of the device's intake mailbox.
    pub intake_sender_id: [u8; 16],
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
            let version_key = known_version_key(&key);
            let known = self
                .store
                .get(Tree::State, &version_key)?
                .and_then(|bytes| bytes.as_slice().try_into().ok().map(u64::from_be_bytes));
            let list = verify_device_list(document, &key, self.now(), known)?;
            if known.is_none_or(|known| list.version > known) {
                self.store
                    .put(Tree::State, &version_key, &list.version.to_be_bytes())?;
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
        let response = self.transport.directory().list(request).await?.into_inner();
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
            .directory()
            .get(proto::GetRequest {
                supporter_key: key.to_vec(),
            })
            .await?
            .into_inner();
        let revocations = self
            .transport
            .directory()
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
