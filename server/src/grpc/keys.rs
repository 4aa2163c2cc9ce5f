//! `haven.v1.Keys`: devices publish prekeys, supporters set capacity,
//! help-seekers claim bundles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use haven_proto::auth::Method;
use haven_proto::v1 as proto;
use haven_store::{DeviceKey, DocumentKind, PrekeyUpload, PublicKey, SupporterKey};
use prost::Message as _;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::address::AddressKey;
use super::convert;
use super::incoming::ConnectionState;
use super::mailbox::unary;
use crate::relay::{Claims, Rate, Relay, RelayError, connection_claims_exhausted, now_ms};

const SERVICE: &str = "haven.v1.Keys";
const SIGNATURE_LEN: usize = 64;
const X25519_LEN: usize = 32;
const KEM_PUBLIC_LEN: usize = 1184;
/// Most one-time prekeys of each kind in one upload.
const MAX_UPLOAD: usize = 200;

/// Most claim answers kept for retries. Claims are rate-limited per supporter
/// and per connection and live one window (about two minutes): an honest
/// directory of ~90 supporters comes nowhere near it.
const MAX_CLAIM_ANSWERS: usize = 4096;

/// The `Keys` service.
pub struct KeysService {
    relay: Arc<Relay>,
    /// The answer to each claim of the last window, by the digest of its
    /// claim nonce, with the supporter it was for and when it may be forgotten
    /// (ms): the same claim sent again after a lost answer gets the same
    /// bundles instead of a replay refusal, and burns no second capacity unit
    /// or one-time prekeys (review F18). In this node's memory only. std Mutex:
    /// a lookup or insert, never held across an await.
    claims: Mutex<HashMap<[u8; 32], ClaimAnswer>>,
    /// Claims per source address (its per-boot salted hash, never the
    /// address), when `Config::claims_per_address` is not 0 (review F7).
    per_address: Option<Claims<AddressKey>>,
}

/// Most addresses whose claim rate is tracked; past it the one touched longest
/// ago is forgotten (a fresh burst). About 100 bytes each.
const MAX_CLAIM_ADDRESSES_TRACKED: usize = 100_000;

/// A claim's answer, kept for a retry.
struct ClaimAnswer {
    supporter: SupporterKey,
    forget_at_ms: u64,
    response: proto::ClaimBundlesResponse,
}

impl KeysService {
    /// A service over `relay`.
    pub fn new(relay: Arc<Relay>) -> Self {
        let per_minute = relay.config().claims_per_address();
        let per_address = (per_minute > 0).then(|| {
            Claims::new(
                Rate {
                    per_minute,
                    burst: per_minute,
                },
                MAX_CLAIM_ADDRESSES_TRACKED,
            )
        });
        Self {
            relay,
            claims: Mutex::new(HashMap::new()),
            per_address,
        }
    }

    /// The answer kept for the claim with this nonce digest, if it was for
    /// `supporter` and is still within its window.
    fn kept_claim(
        &self,
        digest: &[u8; 32],
        supporter: &SupporterKey,
        now_ms: u64,
    ) -> Option<proto::ClaimBundlesResponse> {
        let claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        claims
            .get(digest)
            .filter(|kept| kept.supporter == *supporter && kept.forget_at_ms >= now_ms)
            .map(|kept| kept.response.clone())
    }

    /// Keeps a claim's answer until its timestamp leaves the window.
    fn keep_claim(&self, digest: [u8; 32], answer: ClaimAnswer, now_ms: u64) {
        let mut claims = self.claims.lock().unwrap_or_else(PoisonError::into_inner);
        if claims.len() >= MAX_CLAIM_ANSWERS {
            claims.retain(|_, kept| kept.forget_at_ms >= now_ms);
        }
        // Still full: this one is not kept; its retry is refused as a replay.
        if claims.len() < MAX_CLAIM_ANSWERS {
            claims.insert(digest, answer);
        }
    }
}

fn check_len(bytes: &[u8], len: usize, field: &str) -> Result<(), RelayError> {
    if bytes.len() != len {
        return Err(RelayError::invalid(format!(
            "{field} must be {len} bytes, got {}",
            bytes.len()
        )));
    }
    Ok(())
}

fn signed_prekey(prekey: Option<&proto::SignedPrekey>) -> Result<Vec<u8>, RelayError> {
    let prekey = prekey.ok_or_else(|| RelayError::invalid("signed_prekey is required"))?;
    check_len(&prekey.public_key, X25519_LEN, "signed_prekey.public_key")?;
    check_len(&prekey.signature, SIGNATURE_LEN, "signed_prekey.signature")?;
    Ok(prekey.encode_to_vec())
}

fn kem_prekey(
    prekey: &proto::KemPrekey,
    one_time: bool,
    field: &str,
) -> Result<Vec<u8>, RelayError> {
    if prekey.one_time != one_time {
        return Err(RelayError::invalid(format!(
            "{field}.one_time must be {one_time}"
        )));
    }
    check_len(
        &prekey.public_key,
        KEM_PUBLIC_LEN,
        &format!("{field}.public_key"),
    )?;
    check_len(
        &prekey.signature,
        SIGNATURE_LEN,
        &format!("{field}.signature"),
    )?;
    Ok(prekey.encode_to_vec())
}

/// The upload, checked field by field, as the store keeps it.
fn upload(
    request: &proto::PublishPrekeysRequest,
    supporter: &SupporterKey,
) -> Result<(DeviceKey, PrekeyUpload), RelayError> {
    check_len(
        &request.identity_key,
        haven_proto::directory::DEVICE_IDENTITY_LEN,
        "identity_key",
    )?;
    let device = device_index(supporter, &request.identity_key[..32]);
    if request.one_time_prekeys.len() > MAX_UPLOAD
        || request.kem_one_time_prekeys.len() > MAX_UPLOAD
    {
        return Err(RelayError::invalid(format!(
            "at most {MAX_UPLOAD} one-time prekeys of each kind per upload"
        )));
    }
    let kem_last_resort = request
        .kem_last_resort
        .as_ref()
        .ok_or_else(|| RelayError::invalid("kem_last_resort is required"))?;
    let mut one_time = Vec::with_capacity(request.one_time_prekeys.len());
    for prekey in &request.one_time_prekeys {
        check_len(
            &prekey.public_key,
            X25519_LEN,
            "one_time_prekeys.public_key",
        )?;
        check_len(
            &prekey.signature,
            SIGNATURE_LEN,
            "one_time_prekeys.signature",
        )?;
        one_time.push((prekey.id, prekey.encode_to_vec()));
    }
    let mut kem_one_time = Vec::with_capacity(request.kem_one_time_prekeys.len());
    for prekey in &request.kem_one_time_prekeys {
        kem_one_time.push((prekey.id, kem_prekey(prekey, true, "kem_one_time_prekeys")?));
    }
    Ok((
        device,
        PrekeyUpload {
            signed_prekey: signed_prekey(request.signed_prekey.as_ref())?,
            kem_last_resort: kem_prekey(kem_last_resort, false, "kem_last_resort")?,
            one_time,
            kem_one_time,
        },
    ))
}

/// The store's index of a device's prekeys: a labelled SHA-256 of its
/// supporter's key and its 32-byte Ed25519 key, so that the relay keeps no
/// device identity outside the signed device list, and so that one supporter's
/// list naming another supporter's device (nothing stops it: a list is signed
/// by its supporter alone) reaches nothing of that device's prekeys — before,
/// the index was the device key alone, and such a list dropped again removed
/// them, or claims for it took them (fresh review of H-B).
pub(super) fn device_index(supporter: &SupporterKey, device_key: &[u8]) -> DeviceKey {
    DeviceKey::from_bytes(
        Sha256::new()
            .chain_update(b"haven.v1.prekey-index")
            .chain_update(supporter.as_bytes())
            .chain_update(device_key.get(..32).unwrap_or(device_key))
            .finalize()
            .into(),
    )
}

/// Whether `identity_key` is in the device list `supporter` published, and the
/// supporter is not revoked.
pub(super) async fn listed_device(
    store: &dyn haven_store::Store,
    supporter: &SupporterKey,
    identity_key: &[u8],
) -> Result<bool, RelayError> {
    if store
        .document(DocumentKind::Revocation, supporter)
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let Some(list) = store.document(DocumentKind::DeviceList, supporter).await? else {
        return Ok(false);
    };
    let list: proto::SignedDocument = decode(&list)?;
    let list: proto::DeviceList = decode(&list.body)?;
    Ok(list
        .devices
        .iter()
        .any(|listed| listed.identity_key == identity_key))
}

fn unlisted_device() -> RelayError {
    RelayError::FailedPrecondition(
        "this device is not in the supporter's published device list: publish the device \
         list with it first (prekeys are kept only for listed devices)"
            .into(),
    )
}

fn decode<M: prost::Message + Default>(blob: &[u8]) -> Result<M, RelayError> {
    M::decode(blob).map_err(|_| RelayError::Internal("stored prekey does not decode".into()))
}

fn supporter_key(bytes: &[u8]) -> Result<SupporterKey, RelayError> {
    SupporterKey::from_slice(bytes).ok_or_else(|| {
        RelayError::invalid(format!(
            "supporter_key must be 32 bytes, got {}",
            bytes.len()
        ))
    })
}

#[tonic::async_trait]
impl proto::keys_server::Keys for KeysService {
    async fn publish_prekeys(
        &self,
        request: Request<proto::PublishPrekeysRequest>,
    ) -> Result<Response<proto::PublishPrekeysResponse>, Status> {
        unary(SERVICE, "PublishPrekeys", async {
            let request = request.into_inner();
            let supporter = supporter_key(&request.supporter_key)?;
            let (device, upload) = upload(&request, &supporter)?;
            let digest = haven_proto::keys::upload_digest(&request);
            // upload() checked the length: the first 32 bytes are the Ed25519 key.
            let device_key = PublicKey::from_slice(&request.identity_key[..32])
                .ok_or_else(|| RelayError::invalid("identity_key is malformed"))?;
            let authenticator = self.relay.authenticator();
            let auth = convert::auth(request.auth)?;
            let verified = authenticator.verify(
                Method::PublishPrekeys,
                device_key.as_bytes(),
                &device_key,
                auth,
                &[&digest],
                now_ms(),
            )?;
            // Only a device in its supporter's signed list may keep prekeys
            // here (review F1 b, H-B): made-up device keys are answered before
            // anything is remembered or stored, and what the listed devices
            // hold is bounded by the association-signed directory (at most
            // MAX_DEVICES per supporter, MAX_ONE_TIME_PREKEYS of each kind).
            let store = self.relay.store();
            if !listed_device(store.as_ref(), &supporter, &request.identity_key).await? {
                return Err(unlisted_device());
            }
            // A full relay refuses before anything is remembered, here or in
            // the store (review M-C).
            self.relay.check_room(crate::relay::Write::Prekeys)?;
            authenticator.remember(verified, now_ms())?;
            // On every node and after a restart too: a replayed upload would
            // put back one-time prekeys already handed out (review F13).
            if let Some(auth) = auth {
                self.relay.remember_in_store(&auth, now_ms()).await?;
            }
            let count = store.publish_prekeys(&device, upload).await?;
            // The list may have lost this device meanwhile: whoever published
            // it removed the prekeys it could see, and these came after its
            // read, so they are removed here (store calls are ordered).
            if !listed_device(store.as_ref(), &supporter, &request.identity_key).await? {
                store.remove_prekeys(&device).await?;
                return Err(unlisted_device());
            }
            Ok(proto::PublishPrekeysResponse {
                one_time_prekeys: count.one_time,
                kem_one_time_prekeys: count.kem_one_time,
            })
        })
        .await
    }

    async fn prekey_count(
        &self,
        request: Request<proto::PrekeyCountRequest>,
    ) -> Result<Response<proto::PrekeyCountResponse>, Status> {
        unary(SERVICE, "PrekeyCount", async {
            let request = request.into_inner();
            let device_key = PublicKey::from_slice(&request.device_key).ok_or_else(|| {
                RelayError::invalid(format!(
                    "device_key must be 32 bytes, got {}",
                    request.device_key.len()
                ))
            })?;
            let supporter = supporter_key(&request.supporter_key)?;
            let device = device_index(&supporter, device_key.as_bytes());
            let authenticator = self.relay.authenticator();
            let verified = authenticator.verify(
                Method::PrekeyCount,
                device_key.as_bytes(),
                &device_key,
                convert::auth(request.auth)?,
                &[],
                now_ms(),
            )?;
            // An unknown device is answered before its signature is remembered, so
            // requests with made-up keys cost the replay memory nothing (review F3).
            let count = self
                .relay
                .store()
                .prekey_count(&device)
                .await?
                .ok_or_else(|| {
                    RelayError::NotFound("this device has not published prekeys".into())
                })?;
            authenticator.remember(verified, now_ms())?;
            Ok(proto::PrekeyCountResponse {
                one_time_prekeys: count.one_time,
                kem_one_time_prekeys: count.kem_one_time,
            })
        })
        .await
    }

    async fn set_capacity(
        &self,
        request: Request<proto::SetCapacityRequest>,
    ) -> Result<Response<proto::SetCapacityResponse>, Status> {
        unary(SERVICE, "SetCapacity", async {
            let request = request.into_inner();
            let supporter = supporter_key(&request.supporter_key)?;
            let authenticator = self.relay.authenticator();
            let auth = convert::auth(request.auth)?;
            let verified = authenticator.verify(
                Method::SetCapacity,
                supporter.as_bytes(),
                &PublicKey::from_bytes(*supporter.as_bytes()),
                auth,
                &[&request.capacity.to_be_bytes()],
                now_ms(),
            )?;
            // Unknown supporters are answered before anything is remembered.
            if self
                .relay
                .store()
                .document(DocumentKind::Entry, &supporter)
                .await?
                .is_none()
            {
                return Err(RelayError::NotFound(
                    "no directory entry for this supporter".into(),
                ));
            }
            authenticator.remember(verified, now_ms())?;
            // A replayed older capacity would reopen a paused supporter (F13).
            if let Some(auth) = auth {
                self.relay.remember_in_store(&auth, now_ms()).await?;
            }
            self.relay
                .store()
                .set_capacity(&supporter, request.capacity)
                .await?;
            Ok(proto::SetCapacityResponse {})
        })
        .await
    }

    async fn claim_bundles(
        &self,
        request: Request<proto::ClaimBundlesRequest>,
    ) -> Result<Response<proto::ClaimBundlesResponse>, Status> {
        let connection = ConnectionState::of(request.extensions()).cloned();
        unary(SERVICE, "ClaimBundles", async {
            let request = request.into_inner();
            let supporter = supporter_key(&request.supporter_key)?;
            check_len(&request.claim_nonce, 16, "claim_nonce")?;
            let now = now_ms();
            let authenticator = self.relay.authenticator();
            authenticator.check_window(request.timestamp_ms, now)?;
            let difficulty = self.relay.config().intake_pow_difficulty;
            if !haven_proto::pow::verify(
                supporter.as_bytes(),
                &request.claim_nonce,
                &haven_proto::keys::claim_stamp_input(request.timestamp_ms),
                request.pow_stamp,
                difficulty,
            ) {
                return Err(RelayError::PermissionDenied(format!(
                    "claiming bundles needs a proof-of-work stamp of {difficulty} bits (see GetInfo)"
                )));
            }
            // After the stamp, so refusals cost the caller its CPU too; before
            // anything is remembered or read (review F7).
            let connection_rate = self.relay.config().limits.connection_claim_rate();
            if connection.as_ref().is_some_and(|c| !c.allow_claim(connection_rate, now)) {
                return Err(connection_claims_exhausted());
            }
            let digest: [u8; 32] =
                Sha256::new().chain_update(b"claim").chain_update(&request.claim_nonce).finalize().into();
            // The same claim again (its stamp binds supporter, nonce and time):
            // the answer it got, nothing taken twice (review F18).
            if let Some(response) = self.kept_claim(&digest, &supporter, now) {
                return Ok(response);
            }
            // A claim for a supporter who is not listed (made up, or revoked)
            // is answered before anything is remembered: before, each one took
            // a place in the replay memory of established keys, and a flood of
            // them raised its floor past clients whose clocks lag (fresh
            // review, claims in the replay memory).
            let store = self.relay.store();
            if store.document(DocumentKind::Revocation, &supporter).await?.is_some() {
                return Err(RelayError::NotFound("this supporter is no longer listed".into()));
            }
            let list = store
                .document(DocumentKind::DeviceList, &supporter)
                .await?
                .ok_or_else(|| RelayError::NotFound("this supporter has no device list".into()))?;
            let list: proto::SignedDocument = decode(&list)?;
            let list: proto::DeviceList = decode(&list.body)?;
            let devices: Vec<DeviceKey> =
                list.devices.iter().filter_map(|d| Some(device_index(&supporter, d.identity_key.get(..32)?))).collect();
            // Remembered before the rate checks, so a replay is refused
            // without spending anything of them. Anyone can make a claim for
            // a listed supporter for the price of a stamp (those the rates
            // refuse are remembered too), so claim nonces share the memory of
            // the other stamp-paid requests, Create's: a flood of them never
            // evicts the signatures of established keys.
            authenticator.remember_once(
                crate::relay::auth::Pool::NewKey,
                digest,
                request.timestamp_ms,
                now,
                "claim nonce",
            )?;
            // Only for a listed supporter, so made-up keys take no place in the
            // bounded maps and spend nothing of an address's claims (a
            // neighbour behind the same NAT claiming for made-up keys would);
            // after a kept retry's answer; before the claim's durable write
            // (review F7).
            if let (Some(per_address), Some(connection)) = (&self.per_address, &connection)
                && !per_address.allow(&connection.address(), now)
            {
                return Err(RelayError::ResourceExhausted(
                    "too many claims from this network address right now; try again in a minute"
                        .into(),
                ));
            }
            self.relay.check_claim_rate(&supporter, now)?;
            let claimed = store.claim_bundles(&supporter, &devices).await?;
            let mut bundles = Vec::with_capacity(claimed.len());
            for bundle in claimed {
                let listed = list
                    .devices
                    .iter()
                    .find(|d| d.identity_key.get(..32).map(|key| device_index(&supporter, key)) == Some(bundle.device))
                    .ok_or_else(|| RelayError::Internal("claimed a device that is not listed".into()))?;
                bundles.push(proto::PrekeyBundle {
                    identity_key: listed.identity_key.clone(),
                    signed_prekey: Some(decode(&bundle.signed_prekey)?),
                    one_time_prekey: bundle.one_time.as_deref().map(decode).transpose()?,
                    intake_sender_id: listed.intake_sender_id.clone(),
                    kem_prekey: Some(decode(&bundle.kem)?),
                });
            }
            let response = proto::ClaimBundlesResponse { bundles };
            let forget_at_ms = request
                .timestamp_ms
                .saturating_add(self.relay.config().auth_skew_seconds.saturating_mul(1000));
            self.keep_claim(
                digest,
                ClaimAnswer {
                    supporter,
                    forget_at_ms,
                    response: response.clone(),
                },
                now,
            );
            Ok(response)
        })
        .await
    }
}
