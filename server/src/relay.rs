//! The relay's decisions, as plain async functions of (request, stored state,
//! now): who may create, secure, post, read, acknowledge and delete. No tonic
//! here; `grpc` parses the wire into these types and maps the results back.

pub mod auth;
pub mod budget;
pub mod claims;
pub mod error;
pub mod fetch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use haven_proto::auth::{Method, send_payload};
use haven_store::{
    EnvelopeId, MailboxId, MailboxKind, MailboxRecord, NewEnvelope, PublicKey, PushRegistration,
    PutOutcome, Quota, RequestDigest, SenderCheck, SenderId, SpentStamp, Store, StoreError,
    StoredEnvelope, SupporterKey, bucket_end,
};
use sha2::{Digest as _, Sha256};

pub use auth::{Auth, Authenticator, ReplayBounds};
pub use budget::{StorageBudget, Write};
pub use claims::{Bucket, Claims, Rate, SupporterClaims};
pub use error::RelayError;

use crate::config::Config;
use crate::push::Pusher;

/// A `Send` as parsed from the wire.
pub struct SendInput {
    /// The mailbox's sender id.
    pub sender_id: SenderId,
    /// The client's id for the envelope.
    pub envelope_id: EnvelopeId,
    /// Requested TTL; 0 means the default.
    pub ttl_seconds: u64,
    /// Opaque sealed bytes.
    pub ciphertext: Vec<u8>,
    /// Signature by the sender key, for secured mailboxes.
    pub sender_signature: Option<Vec<u8>>,
    /// Proof-of-work nonce, for intake mailboxes.
    pub pow_stamp: Option<u64>,
    /// When the stamp was made, milliseconds since the Unix epoch (0: not sent).
    pub pow_timestamp_ms: u64,
}

/// The relay's state shared by every call.
pub struct Relay {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    authenticator: Authenticator,
    quota: Quota,
    /// The quota of a private mailbox until it is secured (review F1).
    unsecured_quota: Quota,
    /// The relay-wide budget new writes are checked against.
    budget: StorageBudget,
    pusher: Arc<Pusher>,
    /// `ClaimBundles` token buckets per supporter key (review F7).
    claims: SupporterClaims,
}

/// The refusal of a claim beyond the supporter's rate.
fn supporter_claims_exhausted() -> RelayError {
    RelayError::ResourceExhausted(
        "too many claims for this supporter right now; try again in a minute".into(),
    )
}

/// The refusal of a claim beyond the connection's rate.
pub fn connection_claims_exhausted() -> RelayError {
    RelayError::ResourceExhausted(
        "too many claims on this connection right now; try again in a minute".into(),
    )
}

/// Milliseconds since the Unix epoch by the relay clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

impl Relay {
    /// A relay over `store` with `config`'s limits.
    pub fn new(store: Arc<dyn Store>, config: Arc<Config>) -> Self {
        let quota = Quota {
            max_envelopes: config.limits.mailbox_max_envelopes,
            max_bytes: config.limits.mailbox_max_bytes,
        };
        let unsecured_quota = config.limits.unsecured_quota();
        let authenticator = Authenticator::new(ReplayBounds {
            past_skew_ms: config.auth_skew_seconds.saturating_mul(1000),
            future_skew_ms: config.auth_future_skew_seconds.saturating_mul(1000),
            capacity: config.limits.replay_memory_entries,
            per_key: config.limits.replay_entries_per_key,
            new_key_capacity: config.limits.replay_memory_new_key_entries,
        });
        let pusher = Arc::new(Pusher::new(Arc::clone(&store), config.push.clone()));
        let budget = StorageBudget::new(&config);
        let claims = SupporterClaims::new(
            config.limits.supporter_claim_rate(),
            config.limits.max_claim_supporters_tracked,
        );
        Self {
            store,
            config,
            authenticator,
            quota,
            unsecured_quota,
            budget,
            pusher,
            claims,
        }
    }

    /// Refuses a claim for `supporter` beyond its rate (review F7).
    pub fn check_claim_rate(
        &self,
        supporter: &SupporterKey,
        now_ms: u64,
    ) -> Result<(), RelayError> {
        if self.claims.allow(supporter, now_ms) {
            Ok(())
        } else {
            Err(supporter_claims_exhausted())
        }
    }

    /// The store, for the sweeper and streams.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The checker of signed requests (also used by the `Keys` service).
    pub fn authenticator(&self) -> &Authenticator {
        &self.authenticator
    }

    /// Refuses `write` when the relay is full (`budget`).
    pub fn check_room(&self, write: Write) -> Result<(), RelayError> {
        self.budget.check(&*self.store, write)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Creates a mailbox owned by `recipient_key` and returns its two ids.
    pub async fn create(
        &self,
        recipient_key: PublicKey,
        kind: MailboxKind,
        auth: Option<Auth>,
    ) -> Result<(MailboxId, SenderId), RelayError> {
        haven_proto::auth::public_key(recipient_key.as_bytes()).map_err(|_| {
            RelayError::invalid("recipient_key is not a valid 32-byte Ed25519 public key")
        })?;
        // Before the signature, which costs far more to check than the stamp.
        let difficulty = self.config.intake_pow_difficulty;
        let stamped = auth.is_some_and(|auth| {
            haven_proto::pow::create_stamp_ok(
                recipient_key.as_bytes(),
                auth.timestamp_ms,
                &auth.nonce,
                difficulty,
            )
        });
        crate::telemetry::record_create_stamp(stamped);
        if self.config.create_pow_required && !stamped {
            return Err(RelayError::PermissionDenied(format!(
                "creating a mailbox needs a proof-of-work stamp of {difficulty} bits in the \
                 signed nonce (see GetInfo)"
            )));
        }
        let now = now_ms();
        let verified = self.authenticator.verify(
            Method::Create,
            &[],
            &recipient_key,
            auth,
            &[&[kind_byte(kind)]],
            now,
        )?;
        // The ids follow from the signed request, so the same request sent
        // again (a retry after UNAVAILABLE or a lost answer, on any node)
        // finds the mailbox it made instead of making another (review F18).
        let (recipient, sender) = create_ids(verified.digest());
        let repeat = self
            .authenticator
            .is_remembered(auth::Pool::NewKey, &verified);
        if repeat {
            // A repeat only ever answers the mailbox the first request made: one
            // that was refused (a spent stamp, a full relay) makes nothing when
            // sent again, or every refusal would be a way past the stamp and the
            // storage budget (fresh relay review H-A).
            return match self.store.mailbox(&recipient).await? {
                Some(existing)
                    if existing.recipient_key == recipient_key
                        && existing.sender_id == sender
                        && existing.kind == kind =>
                {
                    Ok((recipient, sender))
                }
                _ => Err(RelayError::Unauthenticated(
                    "auth signature was already used; make every request anew".into(),
                )),
            };
        }
        {
            // The key was made for this request: its replay entries go to the
            // memory of new keys, which a flood of them cannot push others out of.
            self.authenticator
                .remember_in(auth::Pool::NewKey, verified, now)?;
            if let Some(auth) = auth.filter(|_| stamped) {
                // Spent once: the key holder could sign the same payload again
                // with another Ed25519 nonce, and the signature memory would
                // not notice.
                let digest: [u8; 32] = Sha256::new()
                    .chain_update(b"create-stamp")
                    .chain_update(recipient_key.as_bytes())
                    .chain_update(auth.timestamp_ms.to_be_bytes())
                    .chain_update(auth.nonce)
                    .finalize()
                    .into();
                self.authenticator.remember_once(
                    auth::Pool::NewKey,
                    digest,
                    auth.timestamp_ms,
                    now,
                    "create stamp",
                )?;
            }
            self.check_room(Write::Mailbox)?;
        }
        // A private mailbox lives unsecured only so long, whatever is done with
        // it; a secured or intake one as long as it is used (review F1, H2).
        let limits = &self.config.limits;
        let lifetime = match kind {
            MailboxKind::Private => limits.unsecured_mailbox_seconds,
            MailboxKind::Intake => limits.mailbox_idle_seconds,
        };
        let expires_at = (now / 1000).saturating_add(lifetime);
        let record =
            MailboxRecord::new(recipient, sender, recipient_key, kind).expiring_at(expires_at);
        match self.store.create_mailbox(record).await {
            Ok(()) => Ok((recipient, sender)),
            Err(StoreError::IdInUse) => match self.store.mailbox(&recipient).await? {
                // Made by this very request before.
                Some(existing)
                    if existing.recipient_key == recipient_key
                        && existing.sender_id == sender
                        && existing.kind == kind =>
                {
                    Ok((recipient, sender))
                }
                // 2^-128: nothing to retry with, the ids are the request's.
                _ => Err(RelayError::Internal("mailbox ids collided".into())),
            },
            Err(other) => Err(other.into()),
        }
    }

    /// Loads the mailbox and checks that `auth` is a fresh signature by its
    /// recipient key for `method` with `fields`.
    pub async fn authorize(
        &self,
        method: Method,
        recipient_id: &MailboxId,
        auth: Option<Auth>,
        fields: &[&[u8]],
    ) -> Result<MailboxRecord, RelayError> {
        let now = now_ms();
        // The clock first: a stale or far-future request costs no store read
        // (on Redis a round trip) and no signature (review F12).
        if let Some(auth) = auth {
            self.authenticator.check_window(auth.timestamp_ms, now)?;
        }
        let record = self
            .store
            .mailbox(recipient_id)
            .await?
            .ok_or_else(|| RelayError::NotFound("mailbox not found".into()))?;
        self.authenticator.check(
            method,
            recipient_id.as_bytes(),
            &record.recipient_key,
            auth,
            fields,
            now,
        )?;
        if let Some(auth) = auth {
            self.remember_in_store(&auth, now).await?;
        }
        if method != Method::Delete {
            self.keep_alive(&record, now / 1000, None).await;
        }
        Ok(record)
    }

    /// Records an accepted signature in the store, shared by every relay on
    /// it and kept across restarts, so that a replay is refused on another
    /// node or after a restart, where this process's memory never saw it
    /// (review F13). Until the timestamp leaves the past window: after that
    /// the window refuses it. What the store keeps: [`RequestDigest`].
    pub async fn remember_in_store(&self, auth: &Auth, now_ms: u64) -> Result<(), RelayError> {
        let past_skew_ms = self.config.auth_skew_seconds.saturating_mul(1000);
        let until = auth
            .timestamp_ms
            .saturating_add(past_skew_ms)
            .div_ceil(1000);
        let digest = RequestDigest::of_signature(&auth.signature);
        if self
            .store
            .remember_request(&digest, until, now_ms / 1000)
            .await?
        {
            Ok(())
        } else {
            Err(RelayError::Unauthenticated(
                "auth signature was already used; make every request anew".into(),
            ))
        }
    }

    /// The mailbox was used (read by its owner, or sent to an envelope that
    /// expires at `holding`): a secured or intake mailbox's idle expiry moves
    /// to `mailbox_idle_seconds` from now, or to the envelope's expiry if
    /// later. One store write per mailbox per expiry bucket at most, since the
    /// deadline is rounded up to one. An unsecured mailbox is not kept alive by
    /// reads, only for as long as an envelope stored in it lives (review M-D:
    /// a help-seeker's reply mailbox stays unsecured until its owner reads the
    /// supporter's first answer, and its fixed deadline deleted that answer
    /// before its TTL when it came late). So a stamped `Create` that nobody
    /// secures lives at most `unsecured_mailbox_seconds` plus one envelope's
    /// TTL past its last send; whoever keeps sending to their own keeps it, as
    /// using a secured one does, within the unsecured quota and the open tier.
    async fn keep_alive(&self, record: &MailboxRecord, now: u64, holding: Option<u64>) {
        if record.idle_expires_at == 0 {
            return;
        }
        let unsecured = record.kind == MailboxKind::Private && record.sender_key.is_none();
        let until = match (unsecured, holding) {
            (true, None) => return,
            (true, Some(expiry)) => expiry,
            (false, holding) => now
                .saturating_add(self.config.limits.mailbox_idle_seconds)
                .max(holding.unwrap_or(0)),
        };
        if bucket_end(until, self.config.expiry_bucket_seconds) <= record.idle_expires_at {
            return;
        }
        // The call that used the mailbox has succeeded; a failed extension is
        // tried again at its next use (for an unsecured mailbox, its next
        // send: a retried one counts). On a task of its own, so that a
        // client going away before it is written does not undo it.
        let store = Arc::clone(&self.store);
        let id = record.recipient_id;
        let extended = tokio::spawn(async move { store.keep_until(&id, until).await });
        match extended.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "extending a mailbox's idle expiry failed"),
            Err(_) => tracing::warn!("extending a mailbox's idle expiry stopped"),
        }
    }

    /// Registers the one sender key of a private mailbox.
    pub async fn secure(
        &self,
        recipient_id: &MailboxId,
        sender_key: PublicKey,
        auth: Option<Auth>,
    ) -> Result<(), RelayError> {
        haven_proto::auth::public_key(sender_key.as_bytes()).map_err(|_| {
            RelayError::invalid("sender_key is not a valid 32-byte Ed25519 public key")
        })?;
        let record = self
            .authorize(Method::Secure, recipient_id, auth, &[sender_key.as_bytes()])
            .await?;
        if record.kind == MailboxKind::Intake {
            return Err(RelayError::FailedPrecondition(
                "intake mailboxes cannot be secured; they take first contacts from anyone".into(),
            ));
        }
        self.store.secure(recipient_id, sender_key).await?;
        // Secured, it now lives as long as it is used.
        let until = (now_ms() / 1000).saturating_add(self.config.limits.mailbox_idle_seconds);
        self.store.keep_until(recipient_id, until).await?;
        Ok(())
    }

    /// The TTL to apply: the default for 0, refused above the maximum.
    pub fn ttl(&self, requested: u64) -> Result<u64, RelayError> {
        let limits = &self.config.limits;
        match requested {
            0 => Ok(limits.default_ttl_seconds),
            ttl if ttl > limits.max_ttl_seconds => Err(RelayError::invalid(format!(
                "ttl_seconds is {ttl}; this relay keeps envelopes at most {} seconds",
                limits.max_ttl_seconds
            ))),
            ttl => Ok(ttl),
        }
    }

    /// Posts one envelope; returns once it is durable.
    pub async fn send(&self, input: SendInput) -> Result<PutOutcome, RelayError> {
        self.send_in(input, None).await
    }

    /// [`Relay::send`] for an item of a `SendBatch`: once one item's sender
    /// signature has been refused, the batch's later items are refused
    /// without a verification, so a batch of garbage signatures costs one
    /// Ed25519 check, not `max_batch` (review F12).
    pub async fn send_in_batch(
        &self,
        input: SendInput,
        signature_failed: &AtomicBool,
    ) -> Result<PutOutcome, RelayError> {
        self.send_in(input, Some(signature_failed)).await
    }

    async fn send_in(
        &self,
        input: SendInput,
        signature_failed: Option<&AtomicBool>,
    ) -> Result<PutOutcome, RelayError> {
        let limits = &self.config.limits;
        let size = input.ciphertext.len() as u64;
        if size == 0 {
            return Err(RelayError::invalid("ciphertext is empty"));
        }
        if size > limits.max_envelope_bytes {
            return Err(RelayError::invalid(format!(
                "ciphertext is {size} bytes; this relay accepts at most {} bytes per envelope",
                limits.max_envelope_bytes
            )));
        }
        let ttl = self.ttl(input.ttl_seconds)?;
        let record = self
            .store
            .mailbox_by_sender(&input.sender_id)
            .await?
            .ok_or_else(|| RelayError::NotFound("no mailbox has this sender id".into()))?;
        // Before any signature or stamp is checked: an intake only ever holds first
        // contacts, so envelopes the size private mailboxes allow cannot pile up
        // there and crowd out what its owner fetches (review F2).
        let intake_limit = limits.intake_envelope_bytes();
        if record.kind == MailboxKind::Intake && size > intake_limit {
            return Err(RelayError::invalid(format!(
                "ciphertext is {size} bytes; intake mailboxes accept first contacts of at most \
                 {intake_limit} bytes"
            )));
        }
        if let Some(sender_key) = record.sender_key {
            let signature = input.sender_signature.as_deref().unwrap_or_default();
            if signature.is_empty() {
                return Err(RelayError::Unauthenticated(
                    "this mailbox is secured: sends must be signed by its sender key".into(),
                ));
            }
            // Every cheap check above came first; the signature is the cost.
            if signature_failed.is_some_and(|failed| failed.load(Ordering::Relaxed)) {
                return Err(RelayError::ResourceExhausted(
                    "not checked: another item of this batch failed its sender signature; send \
                     this one again"
                        .into(),
                ));
            }
            let payload = send_payload(
                input.sender_id.as_bytes(),
                input.envelope_id.as_bytes(),
                input.ttl_seconds,
                &input.ciphertext,
            );
            haven_proto::auth::verify(sender_key.as_bytes(), &payload, signature).map_err(
                |error| {
                    if let Some(failed) = signature_failed {
                        failed.store(true, Ordering::Relaxed);
                    }
                    RelayError::Unauthenticated(format!("sender signature refused: {error}"))
                },
            )?;
        }
        let mut spent = None;
        if record.kind == MailboxKind::Intake {
            spent = Some(self.check_intake_stamp(&input)?);
        }
        // An unsecured private mailbox takes unsigned sends from anyone with its
        // sender id, for free: it holds little until its owner secures it, and
        // only the open tier of the budget.
        let unsecured = record.kind == MailboxKind::Private && record.sender_key.is_none();
        // Nothing awaits between this check and `put_checked` counting the
        // write (on its first poll, under the store's lock), so concurrent
        // sends overshoot the budget by one envelope per worker thread at
        // most (review L2; `concurrent_sends_overshoot_…`). Keep it so.
        self.check_room(if unsecured {
            Write::OpenEnvelope(size)
        } else {
            Write::Envelope(size)
        })?;
        let now = now_ms() / 1000;
        let expires_at = now.saturating_add(ttl);
        let envelope = NewEnvelope {
            id: input.envelope_id,
            expires_at,
            payload: input.ciphertext,
            spent,
        };
        let quota = if unsecured {
            self.unsecured_quota
        } else {
            self.quota
        };
        // Checked against the sender key this send was authorized with, in the
        // store's atomic step: a `Secure` that landed since refuses it (F19).
        let sender_check = SenderCheck::Expect(record.sender_key);
        let outcome = match self
            .store
            .put_checked(&record.recipient_id, envelope, quota, now, sender_check)
            .await
        {
            Err(StoreError::CountQuota { .. } | StoreError::ByteQuota { .. }) if unsecured => {
                return Err(RelayError::ResourceExhausted(format!(
                    "an unsecured mailbox holds at most {} envelopes and {} bytes until its \
                     owner secures it",
                    quota.max_envelopes, quota.max_bytes
                )));
            }
            other => other?,
        };
        if outcome == PutOutcome::Stored {
            // After the envelope is durable; the push decides on its own task.
            self.pusher.arrived(&record.recipient_id);
        }
        // A duplicate too: the first attempt may have stored the envelope and
        // gone away before its mailbox was kept for it (fresh review of M-D).
        self.keep_alive(&record, now, Some(expires_at)).await;
        Ok(outcome)
    }

    /// Checks a first contact's stamp: made within the stamp window, valid at
    /// the current difficulty. Returns what the store remembers of it for the
    /// window, so that a replay stores nothing even after an ack or an
    /// expiry, on every node and after a restart (second fresh review H-1: a
    /// stamp with no time, forgotten at the ack, refilled an intake forever).
    fn check_intake_stamp(&self, input: &SendInput) -> Result<SpentStamp, RelayError> {
        let difficulty = self.config.intake_pow_difficulty;
        let stamp = input.pow_stamp.ok_or_else(|| {
            RelayError::PermissionDenied(format!(
                "sends to an intake mailbox need a proof-of-work stamp of {difficulty} bits \
                 (see GetInfo)"
            ))
        })?;
        let made_ms = input.pow_timestamp_ms;
        if made_ms == 0 {
            return Err(RelayError::PermissionDenied(
                "sends to an intake mailbox need pow_timestamp_ms, the time the stamp was made \
                 (see GetInfo intake_stamp_window_ms and docs/wire.md)"
                    .into(),
            ));
        }
        let now_ms = now_ms();
        let window_ms = self.config.intake_stamp_window_seconds.saturating_mul(1000);
        let ahead_ms = self.config.auth_future_skew_seconds.saturating_mul(1000);
        if made_ms > now_ms.saturating_add(ahead_ms) {
            return Err(RelayError::PermissionDenied(format!(
                "the proof-of-work stamp's time is more than {} s ahead of the relay's clock",
                self.config.auth_future_skew_seconds
            )));
        }
        if made_ms.saturating_add(window_ms) < now_ms {
            return Err(RelayError::PermissionDenied(format!(
                "the proof-of-work stamp is older than this relay's stamp window of {} s; \
                 make a new one",
                self.config.intake_stamp_window_seconds
            )));
        }
        if !haven_proto::pow::intake_stamp_ok(
            input.sender_id.as_bytes(),
            input.envelope_id.as_bytes(),
            &input.ciphertext,
            made_ms,
            stamp,
            difficulty,
        ) {
            return Err(RelayError::PermissionDenied(format!(
                "proof-of-work stamp is not valid for this envelope and time at the current \
                 difficulty of {difficulty} bits"
            )));
        }
        // Remembered a second past the last moment the stamp is accepted.
        let until = made_ms
            .saturating_add(window_ms)
            .div_ceil(1000)
            .saturating_add(1);
        Ok(SpentStamp {
            digest: RequestDigest::of_first_contact(&input.sender_id, &input.envelope_id),
            until,
        })
    }

    /// The mailbox is being read (a Fetch, or a stream attached): the next
    /// arrival may wake the device again at once.
    pub fn reading(&self, recipient_id: &MailboxId) {
        self.pusher.read(recipient_id);
    }

    /// Registers (or, with an empty endpoint, removes) the mailbox's push endpoint.
    pub async fn register_push(
        &self,
        recipient_id: &MailboxId,
        endpoint: String,
        token: Vec<u8>,
        auth: Option<Auth>,
    ) -> Result<(), RelayError> {
        if endpoint.is_empty() {
            if !token.is_empty() {
                return Err(RelayError::invalid(
                    "a token without an endpoint; send both, or neither to remove the registration",
                ));
            }
        } else {
            self.pusher.validate(&endpoint, &token)?;
        }
        self.authorize(
            Method::RegisterPush,
            recipient_id,
            auth,
            &[endpoint.as_bytes(), &token],
        )
        .await?;
        let registration = (!endpoint.is_empty()).then_some(PushRegistration { endpoint, token });
        Ok(self.store.set_push(recipient_id, registration).await?)
    }

    /// The most envelopes one Receive stream may have unacknowledged.
    pub fn window(&self, requested: u32) -> usize {
        let max = self.config.limits.max_receive_window;
        (if requested == 0 {
            max
        } else {
            requested.min(max)
        }) as usize
    }

    /// The oldest stored envelopes, and whether more remain: at most `limit`
    /// (or `max_fetch`) of them, and at most `max_fetch_bytes` of ciphertext, so
    /// that a response always fits what clients decode however large the stored
    /// envelopes are; the first envelope is always returned.
    ///
    /// `hold` runs once the call is authorized and before anything is read,
    /// and what it gives comes back with the page: the caller's budget for
    /// the memory the page will hold (fresh review M-A), so that an
    /// unauthorized Fetch takes none of it and a Fetch the budget refuses
    /// reads nothing.
    pub async fn fetch<Held>(
        &self,
        recipient_id: &MailboxId,
        limit: u32,
        auth: Option<Auth>,
        hold: impl Future<Output = Result<Held, RelayError>>,
    ) -> Result<(Vec<StoredEnvelope>, bool, Held), RelayError> {
        self.authorize(Method::Fetch, recipient_id, auth, &[&limit.to_be_bytes()])
            .await?;
        let held = hold.await?;
        self.reading(recipient_id);
        let max = self.config.limits.max_fetch;
        let limit = if limit == 0 { max } else { limit.min(max) } as usize;
        let now = now_ms() / 1000;
        let limits = &self.config.limits;
        let (envelopes, more) = fetch::page(
            |after, count| self.store.list(recipient_id, after, count, now),
            limit,
            limits.max_fetch_bytes,
            limits.max_envelope_bytes,
        )
        .await?;
        Ok((envelopes, more, held))
    }

    /// Checks a list of acknowledged ids: one acknowledgement may cover a whole
    /// Fetch, a whole window or a whole batch, whichever is largest.
    pub fn check_ack_count(&self, count: usize) -> Result<(), RelayError> {
        let limits = &self.config.limits;
        let max = limits
            .max_fetch
            .max(limits.max_batch)
            .max(limits.max_receive_window) as usize;
        if count > max {
            return Err(RelayError::invalid(format!(
                "{count} envelope ids in one acknowledgement; at most {max}"
            )));
        }
        Ok(())
    }

    /// Deletes acknowledged envelopes; returns how many were still stored.
    pub async fn ack(
        &self,
        recipient_id: &MailboxId,
        envelope_ids: &[EnvelopeId],
        auth: Option<Auth>,
    ) -> Result<u64, RelayError> {
        self.check_ack_count(envelope_ids.len())?;
        let fields: Vec<&[u8]> = envelope_ids.iter().map(|id| &id.as_bytes()[..]).collect();
        self.authorize(Method::Ack, recipient_id, auth, &fields)
            .await?;
        Ok(self.store.ack(recipient_id, envelope_ids).await?)
    }

    /// Deletes a mailbox with everything in it.
    pub async fn delete(
        &self,
        recipient_id: &MailboxId,
        auth: Option<Auth>,
    ) -> Result<(), RelayError> {
        self.authorize(Method::Delete, recipient_id, auth, &[])
            .await?;
        if self.store.delete_mailbox(recipient_id).await? {
            Ok(())
        } else {
            Err(RelayError::NotFound("mailbox not found".into()))
        }
    }
}

/// The ids of the mailbox a `Create` makes, from the SHA-256 of its signature:
/// two hashes under separate labels, so neither id tells the other to anyone
/// without the signature (which only the creator, and the relay, see; the
/// answer carries both ids to the same parties). The signature covers a random
/// nonce ground into a stamp, so choosing ids (to crowd one Redis slot, say)
/// costs a stamp per try.
fn create_ids(signature_digest: &[u8; 32]) -> (MailboxId, SenderId) {
    let id = |label: &[u8]| -> [u8; 16] {
        let hash = Sha256::new()
            .chain_update(b"haven.v1.create-ids")
            .chain_update(label)
            .chain_update(signature_digest)
            .finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash[..16]);
        id
    };
    (
        MailboxId::from_bytes(id(b"recipient")),
        SenderId::from_bytes(id(b"sender")),
    )
}

/// The mailbox kind as signed in a `Create` (the wire enum's number).
pub fn kind_byte(kind: MailboxKind) -> u8 {
    match kind {
        MailboxKind::Private => 1,
        MailboxKind::Intake => 2,
    }
}
