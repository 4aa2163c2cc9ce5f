//! `haven.v1.Directory`: stores and serves signed directory documents, checking
//! every signature on publish. Clients check them again against their own
//! pinned association key; the relay's checks keep its store clean.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use haven_proto::directory::{
    DirectoryError, verify_device_list, verify_revocation, verify_supporter_entry,
};
use haven_proto::v1 as proto;
use haven_store::{DocumentKind, StoreError, SupporterKey};
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};

use super::mailbox::unary;
use crate::relay::{Relay, RelayError, now_ms};

const SERVICE: &str = "haven.v1.Directory";

/// Most verified entries remembered; past it the memory starts again. The
/// directory holds about 90 supporters, so this is only a bound against
/// entries piling up over a long run (each replaced one stays until then).
const MAX_VERIFIED_ENTRIES: usize = 4096;

/// The `Directory` service.
pub struct DirectoryService {
    relay: Arc<Relay>,
    /// Supporter entries whose association signature and fields have been
    /// checked, by SHA-256 of the stored bytes: `List` and `Get` verify each
    /// stored entry once, not on every anonymous call (review F12). The bytes
    /// decide, so a replaced entry is verified anew; only the expiry is
    /// checked again on each use. std Mutex: a lookup or insert, never held
    /// across an await.
    verified: Mutex<HashMap<[u8; 32], proto::SupporterEntry>>,
}

impl DirectoryService {
    /// A service over `relay`.
    pub fn new(relay: Arc<Relay>) -> Self {
        Self {
            relay,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The stored entry `document` (its bytes `stored`) verified against the
    /// association key and still valid at `now`, from memory when its bytes
    /// were verified before.
    fn verified_entry(
        &self,
        stored: &[u8],
        document: &proto::SignedDocument,
        association_key: &[u8; 32],
        now: u64,
    ) -> Option<proto::SupporterEntry> {
        let digest: [u8; 32] = Sha256::digest(stored).into();
        let known = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&digest)
            .cloned();
        if let Some(entry) = known {
            // What the signature check cannot have seen: time passing.
            return (entry.valid_until > now).then_some(entry);
        }
        let entry = verify_supporter_entry(document, association_key, now, &[]).ok()?;
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= MAX_VERIFIED_ENTRIES {
            verified.clear();
        }
        verified.insert(digest, entry.clone());
        Some(entry)
    }

    /// How many entries are remembered as verified (for tests).
    #[cfg(test)]
    fn verified_count(&self) -> usize {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn association_key(&self) -> Result<[u8; 32], RelayError> {
        self.relay.config().association_public_key().ok_or_else(|| {
            RelayError::FailedPrecondition("this relay has no association key configured".into())
        })
    }

    async fn revocations(&self) -> Result<Vec<proto::SignedDocument>, RelayError> {
        let stored = self
            .relay
            .store()
            .documents(DocumentKind::Revocation)
            .await?;
        stored.iter().map(|(_, bytes)| decode(bytes)).collect()
    }

    /// The listing of one supporter, if it is listed (entry valid, not revoked).
    async fn listing(
        &self,
        supporter: &SupporterKey,
        entry: &[u8],
        association_key: &[u8; 32],
        now: u64,
    ) -> Result<Option<(proto::SupporterEntry, proto::DirectoryListing)>, RelayError> {
        let store = self.relay.store();
        if store
            .document(DocumentKind::Revocation, supporter)
            .await?
            .is_some()
        {
            return Ok(None);
        }
        let document: proto::SignedDocument = decode(entry)?;
        let Some(verified) = self.verified_entry(entry, &document, association_key, now) else {
            // Expired since it was published: no longer listed.
            return Ok(None);
        };
        let device_list = store
            .document(DocumentKind::DeviceList, supporter)
            .await?
            .map(|b| decode(&b))
            .transpose()?;
        let taking_new_conversations = store.capacity(supporter).await? > 0;
        Ok(Some((
            verified,
            proto::DirectoryListing {
                entry: Some(document),
                device_list,
                taking_new_conversations,
            },
        )))
    }
}

/// Removes the prekeys of `devices` on a task of its own, and waits for it:
/// if the request is dropped midway (its client went away), the removal still
/// runs to its end.
async fn remove_prekeys_detached(
    store: &Arc<dyn haven_store::Store>,
    devices: Vec<haven_store::DeviceKey>,
) -> Result<(), RelayError> {
    if devices.is_empty() {
        return Ok(());
    }
    let store = Arc::clone(store);
    tokio::spawn(async move {
        for device in devices {
            store.remove_prekeys(&device).await?;
        }
        Ok::<(), StoreError>(())
    })
    .await
    .map_err(|_| RelayError::Internal("removing prekeys stopped".into()))?
    .map_err(RelayError::from)
}

fn decode<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, RelayError> {
    M::decode(bytes).map_err(|_| RelayError::Internal("stored document does not decode".into()))
}

fn document(request: proto::PublishDocumentRequest) -> Result<proto::SignedDocument, RelayError> {
    request
        .document
        .ok_or_else(|| RelayError::invalid("document is required"))
}

fn refused(error: DirectoryError) -> RelayError {
    match error {
        DirectoryError::BadSignature => RelayError::PermissionDenied(error.to_string()),
        DirectoryError::RolledBack { .. } | DirectoryError::Revoked => {
            RelayError::FailedPrecondition(error.to_string())
        }
        _ => RelayError::invalid(error.to_string()),
    }
}

fn supporter(bytes: &[u8]) -> Result<SupporterKey, RelayError> {
    SupporterKey::from_slice(bytes).ok_or_else(|| {
        RelayError::invalid(format!(
            "supporter_key must be 32 bytes, got {}",
            bytes.len()
        ))
    })
}

fn matches(filter: &str, value: &str) -> bool {
    filter.is_empty() || filter.trim().eq_ignore_ascii_case(value.trim())
}

#[tonic::async_trait]
impl proto::directory_server::Directory for DirectoryService {
    async fn publish_entry(
        &self,
        request: Request<proto::PublishDocumentRequest>,
    ) -> Result<Response<proto::PublishDocumentResponse>, Status> {
        unary(SERVICE, "PublishEntry", async {
            let document = document(request.into_inner())?;
            let association_key = self.association_key()?;
            let entry = verify_supporter_entry(&document, &association_key, now_ms() / 1000, &[])
                .map_err(refused)?;
            let key = supporter(&entry.supporter_key)?;
            if self
                .relay
                .store()
                .document(DocumentKind::Revocation, &key)
                .await?
                .is_some()
            {
                return Err(refused(DirectoryError::Revoked));
            }
            // An entry's valid_until is its version: anyone may re-publish an old,
            // still-valid entry (they are public), so one that ends before the
            // stored one is refused, atomically in the store (review F16). The
            // association issues each renewal with a later valid_until, and
            // withdraws a supporter early by revocation.
            match self
                .relay
                .store()
                .put_document(
                    DocumentKind::Entry,
                    &key,
                    document.encode_to_vec(),
                    entry.valid_until,
                )
                .await
            {
                Ok(()) => {}
                Err(StoreError::StaleDocument { .. }) => {
                    return Err(RelayError::FailedPrecondition(
                        "this supporter entry is older than the stored one (its valid_until is \
                         earlier); entries never go back"
                            .into(),
                    ));
                }
                Err(StoreError::ConflictingDocument { .. }) => {
                    return Err(RelayError::FailedPrecondition(
                        "a different supporter entry with the same valid_until is stored; a \
                         renewal needs a later valid_until"
                            .into(),
                    ));
                }
                Err(error) => return Err(error.into()),
            }
            Ok(proto::PublishDocumentResponse {})
        })
        .await
    }

    async fn publish_device_list(
        &self,
        request: Request<proto::PublishDocumentRequest>,
    ) -> Result<Response<proto::PublishDocumentResponse>, Status> {
        unary(SERVICE, "PublishDeviceList", async {
            let document = document(request.into_inner())?;
            // Which supporter it claims to be, to pick the key to check it with.
            let claimed = proto::DeviceList::decode(document.body.as_slice())
                .map_err(|_| RelayError::invalid("device list does not decode"))?;
            let key = supporter(&claimed.supporter_key)?;
            let store = self.relay.store();
            if store.document(DocumentKind::Entry, &key).await?.is_none() {
                return Err(RelayError::NotFound(
                    "no directory entry for this supporter".into(),
                ));
            }
            let stored_list = match store.document(DocumentKind::DeviceList, &key).await? {
                Some(bytes) => {
                    let stored: proto::SignedDocument = decode(&bytes)?;
                    Some(decode::<proto::DeviceList>(&stored.body)?)
                }
                None => None,
            };
            let known = stored_list.as_ref().map(|list| list.version);
            let list = verify_device_list(&document, key.as_bytes(), now_ms() / 1000, known)
                .map_err(refused)?;
            match store
                .put_document(
                    DocumentKind::DeviceList,
                    &key,
                    document.encode_to_vec(),
                    list.version,
                )
                .await
            {
                Ok(()) => {}
                Err(StoreError::ConflictingDocument { .. }) => {
                    // A list is told apart by its version alone; two with one
                    // version would let a relay show different devices to
                    // different help-seekers.
                    return Err(RelayError::FailedPrecondition(
                        "a different device list with this version is stored; publish the \
                         next version"
                            .into(),
                    ));
                }
                Err(error) => return Err(error.into()),
            }
            // A device taken off the list keeps no prekeys here: nobody can
            // claim them, and they would lie on disk for nothing. An upload
            // racing this sees the new list after its write and removes its
            // own (keys.rs).
            // Compared by the index (the supporter and the Ed25519 key), as
            // the store keeps them; detached from this request, so that a
            // client going away midway does not leave them behind.
            let kept: Vec<_> = list
                .devices
                .iter()
                .filter_map(|new| {
                    Some(super::keys::device_index(&key, new.identity_key.get(..32)?))
                })
                .collect();
            let gone: Vec<_> = stored_list
                .iter()
                .flat_map(|old| &old.devices)
                .filter_map(|old| {
                    Some(super::keys::device_index(&key, old.identity_key.get(..32)?))
                })
                .filter(|index| !kept.contains(index))
                .collect();
            remove_prekeys_detached(store, gone).await?;
            Ok(proto::PublishDocumentResponse {})
        })
        .await
    }

    async fn publish_revocation(
        &self,
        request: Request<proto::PublishDocumentRequest>,
    ) -> Result<Response<proto::PublishDocumentResponse>, Status> {
        unary(SERVICE, "PublishRevocation", async {
            let document = document(request.into_inner())?;
            let revocation =
                verify_revocation(&document, &self.association_key()?).map_err(refused)?;
            let key = supporter(&revocation.supporter_key)?;
            let store = self.relay.store();
            store
                .put_document(DocumentKind::Revocation, &key, document.encode_to_vec(), 0)
                .await?;
            // A revoked supporter takes no new conversations, and its devices'
            // prekeys go.
            store.set_capacity(&key, 0).await?;
            if let Some(bytes) = store.document(DocumentKind::DeviceList, &key).await? {
                let stored: proto::SignedDocument = decode(&bytes)?;
                let listed = decode::<proto::DeviceList>(&stored.body)?
                    .devices
                    .iter()
                    .filter_map(|d| {
                        Some(super::keys::device_index(&key, d.identity_key.get(..32)?))
                    })
                    .collect();
                remove_prekeys_detached(store, listed).await?;
            }
            Ok(proto::PublishDocumentResponse {})
        })
        .await
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        unary(SERVICE, "List", async {
            let filter = request.into_inner();
            let association_key = self.association_key()?;
            let now = now_ms() / 1000;
            let mut supporters = Vec::new();
            for (key, entry) in self.relay.store().documents(DocumentKind::Entry).await? {
                let Some((entry, listing)) =
                    self.listing(&key, &entry, &association_key, now).await?
                else {
                    continue;
                };
                let language = filter.language.is_empty()
                    || entry
                        .languages
                        .iter()
                        .any(|language| matches(&filter.language, language));
                if matches(&filter.specialty, &entry.specialty)
                    && matches(&filter.county, &entry.county)
                    && language
                    && (!filter.taking_new_conversations_only || listing.taking_new_conversations)
                {
                    supporters.push(listing);
                }
            }
            Ok(proto::ListResponse {
                supporters,
                revocations: self.revocations().await?,
            })
        })
        .await
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::DirectoryListing>, Status> {
        unary(SERVICE, "Get", async {
            let key = supporter(&request.into_inner().supporter_key)?;
            let association_key = self.association_key()?;
            let entry = self
                .relay
                .store()
                .document(DocumentKind::Entry, &key)
                .await?
                .ok_or_else(|| RelayError::NotFound("no such supporter".into()))?;
            let (_, listing) = self
                .listing(&key, &entry, &association_key, now_ms() / 1000)
                .await?
                .ok_or_else(|| RelayError::NotFound("this supporter is no longer listed".into()))?;
            Ok(listing)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use haven_proto::directory::{DocumentKind as SignedKind, sign};
    use haven_store::{MemoryStore, Store, StoreConfig};

    /// Review F12: every anonymous `List` verified every stored entry's
    /// signature again (about 30 ms of CPU for 500 supporters). Now each
    /// stored entry is verified once; only its expiry is checked on each use.
    #[tokio::test]
    async fn a_stored_entry_is_verified_once_and_its_expiry_on_every_use() {
        let association = SigningKey::from_bytes(&[7; 32]);
        let association_key = association.verifying_key().to_bytes();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(StoreConfig::default()));
        let relay = Arc::new(Relay::new(store, Arc::new(crate::Config::default())));
        let service = DirectoryService::new(relay);
        let body = proto::SupporterEntry {
            supporter_key: vec![9; 32],
            display_name: "Kari".into(),
            valid_until: 2_000,
            ..Default::default()
        }
        .encode_to_vec();
        let document = sign(SignedKind::SupporterEntry, body, &association);
        let stored = document.encode_to_vec();
        assert!(
            service
                .verified_entry(&stored, &document, &association_key, 1_000)
                .is_some()
        );
        assert_eq!(service.verified_count(), 1);
        // The same stored bytes again: answered from memory, without another
        // signature check (a document that would fail one still passes here).
        let unchecked = proto::SignedDocument {
            signature: vec![0; 64],
            ..document.clone()
        };
        assert!(
            service
                .verified_entry(&stored, &unchecked, &association_key, 1_500)
                .is_some()
        );
        // Time still counts.
        assert!(
            service
                .verified_entry(&stored, &document, &association_key, 2_000)
                .is_none()
        );
        // Other bytes are verified anew, and a bad signature is refused.
        let forged = proto::SignedDocument {
            signature: vec![0; 64],
            body: document.body.iter().copied().chain([0x10, 0x01]).collect(),
        };
        assert!(
            service
                .verified_entry(&forged.encode_to_vec(), &forged, &association_key, 1_000)
                .is_none()
        );
        assert_eq!(service.verified_count(), 1);
    }
}
