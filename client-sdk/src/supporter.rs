//! A supporter's side of the directory: the supporter identity, registering this
//! device (identity, prekeys, intake mailbox, signed device list), capacity and
//! keeping prekeys topped up. The association never takes part: adding a device
//! needs only the supporter key.

use ed25519_dalek::SigningKey;
use haven_proto::auth::{Method, request_payload, sign_request};
use haven_proto::directory::{DocumentKind, sign as sign_document, verify_device_list};
use haven_proto::v1 as proto;
use haven_protocol::{Device, IDENTITY_KEY_LEN, PublicPrekey};
use prost::Message as _;

use crate::storage::Tree;
use crate::transport::Lane;
use crate::{Client, Error};

const SUPPORTER_IDENTITY: &[u8] = b"supporter-identity";
const DEVICE: &[u8] = b"device";
const INTAKE: &[u8] = b"intake-mailbox";
/// Set when this device's prekeys are not on the relay yet (after a rotation
/// whose upload failed, or once the device is in its supporter's list but its
/// first upload did not get through), so the next sync uploads them.
pub(crate) const PREKEYS_UNPUBLISHED: &[u8] = b"prekeys-unpublished";
/// The device list this device signed last (its encoded body), the base of the next.
const SIGNED_DEVICE_LIST: &[u8] = b"signed-device-list";
/// One-time prekeys published at a time; topped up when fewer than half remain.
pub const PREKEY_BATCH: usize = 20;
/// How often the device holding the supporter key tells the relay its room for
/// new conversations again, seconds: claims nobody followed with a first
/// contact are given back within this.
pub const CAPACITY_REFRESH_SECONDS: u64 = 300;
/// How long a device list stays valid; devices re-sign it when they update it.
const DEVICE_LIST_VALIDITY_SECONDS: u64 = 30 * 24 * 3600;

fn prekey(prekey: &PublicPrekey) -> proto::SignedPrekey {
    proto::SignedPrekey {
        id: prekey.id,
        public_key: prekey.public_key.clone(),
        signature: prekey.signature.to_vec(),
    }
}

fn kem(prekey: &PublicPrekey) -> proto::KemPrekey {
    proto::KemPrekey {
        id: prekey.id,
        one_time: prekey.one_time,
        public_key: prekey.public_key.clone(),
        signature: prekey.signature.to_vec(),
    }
}

impl Client {
    pub(crate) fn supporter_signing_key(&self) -> Result<Option<SigningKey>, Error> {
        Ok(self
            .store
            .get(Tree::State, SUPPORTER_IDENTITY)?
            .and_then(|seed| {
                let seed: [u8; 32] = seed.as_slice().try_into().ok()?;
                Some(SigningKey::from_bytes(&seed))
            }))
    }

    /// Creates this device's supporter identity (once) and returns its public key,
    /// for the association to sign into a directory entry.
    pub fn create_supporter_identity(&self) -> Result<[u8; 32], Error> {
        if let Some(key) = self.supporter_signing_key()? {
            return Ok(key.verifying_key().to_bytes());
        }
        let key = SigningKey::from_bytes(&rand::random());
        self.store
            .put(Tree::State, SUPPORTER_IDENTITY, &key.to_bytes())?;
        self.store.flush()?;
        Ok(key.verifying_key().to_bytes())
    }

    /// The supporter identity's public key, if this device has one.
    pub fn supporter_key(&self) -> Result<Option<[u8; 32]>, Error> {
        Ok(self
            .supporter_signing_key()?
            .map(|key| key.verifying_key().to_bytes()))
    }

    pub(crate) fn device(&self) -> Result<Option<Device>, Error> {
        self.store
            .get_versioned(crate::storage::Owner::Device, Tree::State, DEVICE)?
            .map(|snapshot| {
                Device::from_snapshot(&snapshot)
                    .map_err(|e| Error::Storage(format!("device state: {e}")))
            })
            .transpose()
    }

    pub(crate) fn save_device(&self, device: &Device) -> Result<(), Error> {
        self.store.put_versioned(
            crate::storage::Owner::Device,
            Tree::State,
            DEVICE,
            &device.to_snapshot(),
        )
    }

    /// This device's intake mailbox, created on first use.
    async fn intake(&self) -> Result<crate::conversation::Inbox, Error> {
        self.recorded_inbox(INTAKE, proto::MailboxKind::Intake)
            .await
    }

    /// This device's intake mailbox, if it registered as a supporter device.
    pub(crate) fn intake_inbox(&self) -> Result<Option<crate::conversation::Inbox>, Error> {
        self.stored_inbox(INTAKE)
    }

    /// Signs a `Keys` request payload with the device identity.
    fn device_auth(
        &self,
        device: &Device,
        method: Method,
        fields: &[&[u8]],
    ) -> Result<proto::Auth, Error> {
        let key = &device.identity_key().to_bytes()[..32];
        let timestamp_ms = self.now_ms();
        let nonce: [u8; 16] = rand::random();
        let payload = request_payload(method, key, timestamp_ms, &nonce, fields);
        let signature = device
            .identity()
            .sign_relay_request(&payload)
            .ok_or_else(|| Error::Storage("refused to sign a non-relay payload".into()))?;
        Ok(proto::Auth {
            timestamp_ms,
            nonce: nonce.to_vec(),
            signature: signature.to_vec(),
        })
    }

    /// The supporter whose signed device list has this device: its own key on
    /// the device holding it, the linked one on a linked device; `None` on a
    /// device that is in no list yet (one showing a link code).
    pub(crate) fn listing_supporter(&self) -> Result<Option<[u8; 32]>, Error> {
        match self.supporter_key()? {
            Some(key) => Ok(Some(key)),
            None => self.linked_supporter_key(),
        }
    }

    /// Uploads the current signed and last-resort prekeys and the one-time
    /// prekeys never uploaded before, then records that they were. The relay
    /// keeps prekeys only for a device in its supporter's published list, so
    /// this comes after the list.
    async fn publish_prekeys(&self, device: &mut Device) -> Result<(), Error> {
        let supporter_key = self
            .listing_supporter()?
            .ok_or(Error::NoSupporterIdentity)?;
        let published = device.prekeys_to_publish();
        let mut request = proto::PublishPrekeysRequest {
            identity_key: published.identity.to_vec(),
            signed_prekey: Some(prekey(&published.signed_prekey)),
            kem_last_resort: Some(kem(&published.kem_last_resort)),
            one_time_prekeys: published
                .one_time
                .iter()
                .map(|p| proto::OneTimePrekey {
                    id: p.id,
                    public_key: p.public_key.clone(),
                    signature: p.signature.to_vec(),
                })
                .collect(),
            kem_one_time_prekeys: published.kem_one_time.iter().map(kem).collect(),
            auth: None,
            supporter_key: supporter_key.to_vec(),
        };
        let digest = haven_proto::keys::upload_digest(&request);
        request.auth = Some(self.device_auth(device, Method::PublishPrekeys, &[&digest])?);
        self.transport
            .keys(Lane::Device)
            .publish_prekeys(request)
            .await?;
        device.mark_published();
        self.save_device(device)?;
        self.store.flush()
    }

    /// Rotates the signed and last-resort prekeys when they are due (weekly;
    /// with `force`, now) and uploads them; also uploads rotated ones an earlier
    /// upload failed to deliver. The new secrets are on disk before the upload.
    /// Returns whether it rotated. `sync_once` calls it on every sync.
    pub(crate) async fn keep_prekeys_fresh(&self, force: bool) -> Result<bool, Error> {
        let Some(mut device) = self.device()? else {
            return Ok(false);
        };
        let now = self.now();
        let unpublished = self.store.get(Tree::State, PREKEYS_UNPUBLISHED)?.is_some();
        // While the last rotation is not on the relay, rotating again would
        // destroy the keys the relay still hands out.
        let rotated = if unpublished && !force {
            false
        } else if force {
            device.rotate_prekeys(now, &mut rand::rng());
            true
        } else {
            device.rotate_prekeys_if_due(now, &mut rand::rng())
        };
        if rotated {
            self.save_device(&device)?;
            self.store.put(Tree::State, PREKEYS_UNPUBLISHED, &[1])?;
            self.store.flush()?;
        }
        // A device in no list yet cannot upload: the flag stays, and the first
        // sync after its link completes uploads.
        if (rotated || unpublished) && self.listing_supporter()?.is_some() {
            self.publish_prekeys(&mut device).await?;
            self.store.remove(Tree::State, PREKEYS_UNPUBLISHED)?;
            self.store.flush()?;
        }
        Ok(rotated)
    }

    /// Replaces this supporter device's signed and last-resort prekeys now and
    /// publishes them (they also rotate weekly by themselves, with every sync).
    /// For a suspected compromise: first contacts made to the replaced keys
    /// still complete for a week; ones made to the keys before them are refused.
    pub async fn rotate_prekeys_now(&self) -> Result<(), Error> {
        let _state = self.state_lock.lock().await;
        if self.device()?.is_none() {
            return Err(Error::NoSupporterIdentity);
        }
        self.keep_prekeys_fresh(true).await.map(|_| ())
    }

    /// Registers this device for the supporter identity: device keys, an intake
    /// mailbox, prekeys on the relay, and a new version of the supporter's signed
    /// device list with this device in it. Idempotent: running it again
    /// republishes. Needs the supporter's directory entry to be published.
    pub async fn register_supporter_device(&self) -> Result<(), Error> {
        // The device's state (prekeys, replay memory) is read and written back
        // across relay calls: nothing else may change it meanwhile.
        let _state = self.state_lock.lock().await;
        let supporter = self
            .supporter_signing_key()?
            .ok_or(Error::NoSupporterIdentity)?;
        let mut device = self.prepared_device()?;
        let intake = self.intake().await?;
        let entry = proto::DeviceEntry {
            identity_key: device.identity_key().to_bytes().to_vec(),
            intake_sender_id: intake.sender_id.to_vec(),
        };
        // The relay takes prekeys only for a listed device: the list goes
        // first. Until the upload is through, claims for this supporter are
        // refused; a failed upload is retried by the next sync.
        self.store.put(Tree::State, PREKEYS_UNPUBLISHED, &[1])?;
        self.store.flush()?;
        self.publish_device_list_with(&supporter, entry).await?;
        self.publish_prekeys(&mut device).await?;
        self.store.remove(Tree::State, PREKEYS_UNPUBLISHED)?;
        self.store.flush()
    }

    /// This device's keys, created with a first batch of prekeys if needed (not
    /// uploaded here: the relay takes them once the device is listed).
    pub(crate) fn prepared_device(&self) -> Result<Device, Error> {
        let device = match self.device()? {
            Some(device) => device,
            None => {
                let mut rng = rand::rng();
                let mut device = Device::generate(self.now(), &mut rng);
                device.generate_one_time_prekeys(PREKEY_BATCH, &mut rng);
                self.save_device(&device)?;
                self.store.flush()?;
                device
            }
        };
        Ok(device)
    }

    /// Publishes the next version of the supporter's device list, with `entry`
    /// added (or updated, for the same device identity).
    pub(crate) async fn publish_device_list_with(
        &self,
        supporter: &SigningKey,
        entry: proto::DeviceEntry,
    ) -> Result<(), Error> {
        self.publish_device_list(supporter, |devices| {
            devices.retain(|existing| existing.identity_key != entry.identity_key);
            devices.push(entry);
        })
        .await
    }

    /// Publishes the next version of the supporter's device list, `edit`ed.
    ///
    /// The next list is built from the last one this device signed (kept here),
    /// never from the relay's copy, so a relay serving an older list cannot make
    /// the supporter sign a removed device back in (review 2026-12-crypto #8);
    /// only a device that never signed one starts from the relay's, verified.
    /// The list is kept before it is published, so a retry signs a newer
    /// version rather than the same version twice.
    async fn publish_device_list(
        &self,
        supporter: &SigningKey,
        edit: impl FnOnce(&mut Vec<proto::DeviceEntry>),
    ) -> Result<(), Error> {
        let supporter_key = supporter.verifying_key().to_bytes();
        let (version, mut devices) = match self.signed_device_list()? {
            Some(list) => (list.version, list.devices),
            None => {
                let listing = self
                    .transport
                    .directory(Lane::Device)
                    .get(proto::GetRequest {
                        supporter_key: supporter_key.to_vec(),
                    })
                    .await?
                    .into_inner();
                match &listing.device_list {
                    Some(document) => {
                        let list = verify_device_list(document, &supporter_key, self.now(), None)?;
                        (list.version, list.devices)
                    }
                    None => (0, Vec::new()),
                }
            }
        };
        edit(&mut devices);
        if devices.is_empty() {
            return Err(Error::InvalidArgument(
                "a supporter's device list needs at least one device".into(),
            ));
        }
        let list = proto::DeviceList {
            supporter_key: supporter_key.to_vec(),
            version: version.saturating_add(1),
            devices,
            valid_until: self.now() + DEVICE_LIST_VALIDITY_SECONDS,
        };
        let body = list.encode_to_vec();
        self.store.put_versioned(
            crate::storage::Owner::Device,
            Tree::State,
            SIGNED_DEVICE_LIST,
            &body,
        )?;
        self.store.flush()?;
        let document = sign_document(DocumentKind::DeviceList, body, supporter);
        self.transport
            .directory(Lane::Device)
            .publish_device_list(proto::PublishDocumentRequest {
                document: Some(document),
            })
            .await?;
        Ok(())
    }

    /// The device list this device signed last, if it signed one.
    fn signed_device_list(&self) -> Result<Option<proto::DeviceList>, Error> {
        self.store
            .get_versioned(
                crate::storage::Owner::Device,
                Tree::State,
                SIGNED_DEVICE_LIST,
            )?
            .map(|bytes| {
                proto::DeviceList::decode(bytes.as_slice())
                    .map_err(|_| Error::Storage("the signed device list is malformed".into()))
            })
            .transpose()
    }

    /// The identities (128 bytes each) in this supporter's device list, as this
    /// device last signed it; empty on a device without the supporter key.
    pub fn supporter_devices(&self) -> Result<Vec<[u8; IDENTITY_KEY_LEN]>, Error> {
        Ok(self
            .signed_device_list()?
            .map(|list| {
                list.devices
                    .iter()
                    .filter_map(|device| device.identity_key.as_slice().try_into().ok())
                    .collect()
            })
            .unwrap_or_default())
    }

    /// This device's identity (128 bytes), as it appears in device lists and
    /// link codes; `None` until the device has keys.
    pub fn device_identity(&self) -> Result<Option<[u8; IDENTITY_KEY_LEN]>, Error> {
        Ok(self
            .device()?
            .map(|device| device.identity_key().to_bytes()))
    }

    /// Removes a device (lost, stolen, replaced) from the supporter's signed
    /// device list: help-seekers stop writing to it, the relay stops handing
    /// out its prekeys, and this device stops sending it sync copies. Needs
    /// the supporter key. Conversations it already has stay on it until they
    /// end; wipe or revoke the device itself for those.
    pub async fn remove_device(&self, identity: &[u8; IDENTITY_KEY_LEN]) -> Result<(), Error> {
        let _state = self.state_lock.lock().await;
        let supporter = self.supporter_signing_key_required()?;
        if self
            .device()?
            .is_some_and(|device| device.identity_key().to_bytes() == *identity)
        {
            return Err(Error::InvalidArgument(
                "this device cannot remove itself; remove it from another device".into(),
            ));
        }
        if !self.supporter_devices()?.contains(identity) {
            return Err(Error::InvalidArgument(
                "no such device in this supporter's device list".into(),
            ));
        }
        self.publish_device_list(&supporter, |devices| {
            devices.retain(|device| device.identity_key[..] != identity[..]);
        })
        .await?;
        self.forget_sibling(identity).await
    }

    pub(crate) fn supporter_signing_key_required(&self) -> Result<SigningKey, Error> {
        self.supporter_signing_key()?
            .ok_or(Error::NoSupporterIdentity)
    }

    pub(crate) async fn intake_sender_id(&self) -> Result<Vec<u8>, Error> {
        Ok(self.intake().await?.sender_id.to_vec())
    }

    /// Sets how many conversations this supporter holds open at most; 0 pauses
    /// new contacts. Every device of the supporter enforces it on its own (a
    /// first contact beyond it is turned away, and the help-seeker told so),
    /// and the relay hands out bundles for the room that is left (kept up to
    /// date by the device holding the supporter key as conversations open and end).
    pub async fn set_capacity(&self, capacity: u32) -> Result<(), Error> {
        let _state = self.state_lock.lock().await;
        if self.supporter_signing_key()?.is_none() {
            return Err(Error::NoSupporterIdentity);
        }
        self.save_capacity(capacity)?;
        self.queue_sync_capacity(capacity)?;
        self.store.flush()?;
        self.refresh_relay_capacity().await?;
        // The other devices learn it now or with a later sync.
        self.post_queued(crate::outbox::Owner::Siblings).await?;
        Ok(())
    }

    /// Tells the relay how many more conversations there is room for (this
    /// device's capacity less its open conversations). Only the device holding
    /// the supporter key can; on others it does nothing.
    pub(crate) async fn refresh_relay_capacity(&self) -> Result<(), Error> {
        let Some(supporter) = self.supporter_signing_key()? else {
            return Ok(());
        };
        let room = self.capacity()?.saturating_sub(self.open_conversations()?);
        let key = supporter.verifying_key().to_bytes();
        let auth = sign_request(
            &supporter,
            Method::SetCapacity,
            &key,
            &[&room.to_be_bytes()],
            self.now_ms(),
            rand::random(),
        );
        self.transport
            .keys(Lane::Device)
            .set_capacity(proto::SetCapacityRequest {
                supporter_key: key.to_vec(),
                capacity: room,
                auth: Some(auth),
            })
            .await?;
        self.last_capacity_refresh
            .store(self.now(), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// [`Client::refresh_relay_capacity`] when this device has not told the
    /// relay its room since it was opened or for [`CAPACITY_REFRESH_SECONDS`].
    /// The relay takes a unit of capacity for every claim, and a claim whose
    /// help-seeker never writes gives nothing back: without this, whoever
    /// claimed as many bundles as there was room kept the supporter "not
    /// taking new conversations" until their next real conversation, which
    /// could then never come (relay review F7).
    ///
    /// Every listed device also tops up its one-time prekeys then: claims
    /// nobody followed up took them too, and without one a help-seeker's SDK
    /// refuses the bundle (`NotTakingConversations`), so no first contact would
    /// ever arrive to make the device top up after it.
    pub(crate) async fn refresh_relay_capacity_if_due(&self) -> Result<(), Error> {
        if self.listing_supporter()?.is_none() || self.device()?.is_none() {
            return Ok(());
        }
        let last = self
            .last_capacity_refresh
            .load(std::sync::atomic::Ordering::Relaxed);
        if last != 0 && self.now().saturating_sub(last) < CAPACITY_REFRESH_SECONDS {
            return Ok(());
        }
        self.refresh_relay_capacity().await?;
        // On a device without the supporter key the refresh above does nothing.
        self.last_capacity_refresh
            .store(self.now(), std::sync::atomic::Ordering::Relaxed);
        self.replenish_prekeys_unlocked().await.map(|_| ())
    }

    /// Publishes a new batch of one-time prekeys when fewer than half of a batch
    /// remain on the relay; returns how many the relay holds afterwards.
    /// `sync_once` does this by itself after accepting new conversations.
    pub async fn replenish_prekeys(&self) -> Result<u32, Error> {
        let _state = self.state_lock.lock().await;
        self.replenish_prekeys_unlocked().await
    }

    /// [`Client::replenish_prekeys`] for callers that hold the state lock.
    pub(crate) async fn replenish_prekeys_unlocked(&self) -> Result<u32, Error> {
        let mut device = self.device()?.ok_or(Error::NoSupporterIdentity)?;
        let supporter_key = self
            .listing_supporter()?
            .ok_or(Error::NoSupporterIdentity)?;
        let key = device.identity_key().to_bytes()[..32].to_vec();
        let auth = self.device_auth(&device, Method::PrekeyCount, &[])?;
        let counted = self
            .transport
            .keys(Lane::Device)
            .prekey_count(proto::PrekeyCountRequest {
                device_key: key,
                auth: Some(auth),
                supporter_key: supporter_key.to_vec(),
            })
            .await;
        let remaining = match counted {
            Ok(count) => {
                let count = count.into_inner();
                count.one_time_prekeys.min(count.kem_one_time_prekeys)
            }
            // The relay holds none for this device (removed, lost, or kept
            // under another index): upload them all again, the signed and
            // last-resort prekeys with a new batch, or no help-seeker can
            // reach this device until its weekly rotation.
            Err(status) if status.code() == tonic::Code::NotFound => 0,
            Err(status) => return Err(status.into()),
        };
        if remaining as usize >= PREKEY_BATCH / 2 {
            return Ok(remaining);
        }
        // The thread RNG is not Send: draw the keys before awaiting again.
        device.generate_one_time_prekeys(PREKEY_BATCH, &mut rand::rng());
        self.save_device(&device)?;
        self.store.flush()?;
        self.publish_prekeys(&mut device).await?;
        Ok(remaining + PREKEY_BATCH as u32)
    }
}
