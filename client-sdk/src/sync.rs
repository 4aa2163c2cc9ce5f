//! Syncing: every mailbox of this device fetched in byte-bounded pages and
//! processed on its own, so one mailbox that fails (or one envelope that is
//! hostile) never keeps the others from syncing (review 2026-12-crypto #4,
//! relay review F2). What an envelope's contents cause is that envelope's
//! fault: it is dropped, acknowledged and reported as
//! [`Event::EnvelopeRefused`].

use ed25519_dalek::SigningKey;
use haven_proto::auth::{Method, sign_request};
use haven_proto::v1 as proto;
use sha2::{Digest as _, Sha256};

use crate::conversation::{ConversationId, Event, Inbox};
use crate::outbox::Owner;
use crate::storage::Tree;
use crate::transport::Lane;
use crate::{Client, Error};

/// Envelope ids are remembered for longer than any relay may keep an envelope
/// (14 days at most), so a copy that comes again is always recognised.
pub(crate) const SEEN_FOR_SECONDS: u64 = 15 * 24 * 3600;
const SEEN_PREFIX: &[u8] = b"seen/";
/// How often a sync prunes remembered ids (the first sync of a client does).
const PRUNE_EVERY_SECONDS: u64 = 3600;
/// Pages fetched from one mailbox in one sync. A page is at most the decode
/// limit, so one sync reads at most this many of them from a mailbox; a
/// mailbox flooded beyond that is read on by the next sync, and the others
/// are synced in between.
const PAGES_PER_SYNC: usize = 8;
/// The decode limit when the relay publishes no fetch budget (tonic's default).
const DEFAULT_DECODE_LIMIT: u64 = 4 * 1024 * 1024;
/// The most this SDK decodes in one response, whatever the relay publishes: a
/// relay cannot make the app hold more than this per call.
const MAX_DECODE_LIMIT: u64 = 16 * 1024 * 1024;
/// Framing allowed per envelope when the relay publishes none: ids, lengths,
/// the protobuf and gRPC headers.
const DEFAULT_OVERHEAD: u64 = 1024;
/// The most envelopes asked for in one fetch (and taken from an answer), so a
/// relay that publishes tiny envelope sizes cannot make one page hold millions
/// of them (review of the SDK fixes #1). Relays serve at most 1000 per fetch.
const MAX_FETCH_COUNT: u32 = 1000;
/// The most [`Event::EnvelopeRefused`] one mailbox adds to one sync: a mailbox
/// full of junk is reported, not turned into a list of events as long as the
/// junk (review of the SDK fixes #1). The rest are dropped all the same.
const MAX_REFUSALS_REPORTED: usize = 32;

/// Where an envelope id is remembered: a hash keyed by the mailbox's secret key,
/// so that the store's keys (which are not sealed) never show a relay mailbox
/// id or envelope id, and nothing links them to the relay once the mailbox is
/// gone. SHA-256 over fixed-length fields with a domain; 16 bytes are plenty to
/// tell a device's envelopes apart.
pub(crate) fn seen_key(inbox: &Inbox, envelope_id: &[u8]) -> Vec<u8> {
    let digest = Sha256::new()
        .chain_update(b"haven-sdk/seen/v1")
        .chain_update(&inbox.key[..])
        .chain_update(envelope_id)
        .finalize();
    [SEEN_PREFIX, &digest[..16]].concat()
}

/// How many envelopes to ask for in one fetch, and how large a response to
/// accept, from what the relay publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FetchLimits {
    /// The decode limit for a fetch response.
    pub(crate) decode_limit: usize,
    /// The `limit` sent with each fetch.
    pub(crate) count: u32,
}

impl FetchLimits {
    /// From the relay's published limits: a response is at most the relay's
    /// fetch budget plus one envelope past it plus framing, capped at
    /// [`MAX_DECODE_LIMIT`]; and the count asked for fits that limit even at the
    /// largest envelope size, so a relay without a byte budget cannot overflow
    /// it either.
    pub(crate) fn from_relay(limits: &proto::Limits) -> Self {
        let overhead = if limits.response_overhead_bytes == 0 {
            DEFAULT_OVERHEAD
        } else {
            limits.response_overhead_bytes.min(64 * 1024)
        };
        let envelope = limits.max_envelope_bytes.max(1).saturating_add(overhead);
        let decode = if limits.max_fetch_bytes == 0 {
            DEFAULT_DECODE_LIMIT
        } else {
            limits
                .max_fetch_bytes
                .saturating_add(envelope)
                .saturating_add(overhead)
                .clamp(DEFAULT_DECODE_LIMIT, MAX_DECODE_LIMIT)
        };
        // Never more than the relay serves in one fetch (so one acknowledgement
        // can name a whole page) nor than this SDK takes.
        let most = match limits.max_fetch {
            0 => MAX_FETCH_COUNT,
            max => max.min(MAX_FETCH_COUNT),
        };
        let count = (decode.saturating_sub(overhead) / envelope).clamp(1, u64::from(most));
        Self {
            decode_limit: usize::try_from(decode).unwrap_or(usize::MAX),
            count: u32::try_from(count).unwrap_or(u32::MAX),
        }
    }
}

/// Which mailbox an envelope came in on, so `drain` knows who handles it.
#[derive(Clone, Copy)]
enum Source {
    Siblings,
    Intake,
    /// A conversation's mailbox, named by its recipient id (not its place in
    /// the list: links can go while others are read).
    Conversation(ConversationId, [u8; 16]),
}

/// How the mailboxes of one sync went.
#[derive(Default)]
struct Tally {
    synced: usize,
    failed: usize,
    first_error: Option<Error>,
}

impl Tally {
    fn record(&mut self, outcome: Result<(), Error>) {
        match outcome {
            Ok(()) => self.synced += 1,
            Err(error) => {
                self.failed += 1;
                self.first_error.get_or_insert(error);
            }
        }
    }

    /// The events when any mailbox synced (the ones that failed are tried again
    /// next time); the first error when every one failed (offline, say).
    fn finish(self, events: Vec<Event>) -> Result<Vec<Event>, Error> {
        match self.first_error {
            Some(error) if self.synced == 0 => Err(error),
            Some(error) => {
                tracing::warn!(
                    failed = self.failed,
                    synced = self.synced,
                    %error,
                    "some mailboxes did not sync; they are tried again next time"
                );
                Ok(events)
            }
            None => Ok(events),
        }
    }
}

impl Client {
    /// The fetch limits for this relay, from its published limits.
    async fn fetch_limits(&self) -> Result<FetchLimits, Error> {
        if let Some(limits) = self.transport.fetch_limits() {
            return Ok(limits);
        }
        let info = self
            .transport
            .relay(Lane::Directory)
            .get_info(proto::GetInfoRequest {})
            .await?
            .into_inner();
        let limits = FetchLimits::from_relay(&info.limits.unwrap_or_default());
        self.transport.set_fetch_limits(limits);
        Ok(limits)
    }

    /// One page of a mailbox, and whether the relay holds more.
    pub(crate) async fn fetch(&self, inbox: &Inbox) -> Result<(Vec<proto::Envelope>, bool), Error> {
        let limits = self.fetch_limits().await?;
        let signing = SigningKey::from_bytes(&inbox.key);
        let limit = limits.count;
        let auth = sign_request(
            &signing,
            Method::Fetch,
            &inbox.recipient_id,
            &[&limit.to_be_bytes()],
            self.now_ms(),
            rand::random(),
        );
        let response = self
            .transport
            .mailbox(inbox.lane)
            .fetch(proto::FetchRequest {
                recipient_id: inbox.recipient_id.to_vec(),
                limit,
                auth: Some(auth),
            })
            .await?
            .into_inner();
        let mut envelopes = response.envelopes;
        // More than asked for: the rest is the relay's problem, not this
        // device's memory; it comes again with the next page.
        let more = response.more || envelopes.len() > limit as usize;
        envelopes.truncate(limit as usize);
        Ok((envelopes, more))
    }

    pub(crate) async fn ack(&self, inbox: &Inbox, ids: Vec<Vec<u8>>) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let signing = SigningKey::from_bytes(&inbox.key);
        let fields: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        let auth = sign_request(
            &signing,
            Method::Ack,
            &inbox.recipient_id,
            &fields,
            self.now_ms(),
            rand::random(),
        );
        self.transport
            .mailbox(inbox.lane)
            .ack(proto::AckRequest {
                recipient_id: inbox.recipient_id.to_vec(),
                envelope_ids: ids,
                auth: Some(auth),
            })
            .await?;
        Ok(())
    }

    /// Persists what was processed, remembers the ids of the envelopes that
    /// were taken (so a copy that comes again, e.g. after a lost ack, is dropped
    /// by id), then acknowledges everything processed. Refused envelopes are
    /// not remembered: refusing one again is harmless, and remembering them
    /// would let anyone who can post junk fill the device (review of the SDK
    /// fixes #1).
    pub(crate) async fn settle(
        &self,
        inbox: &Inbox,
        taken: &[Vec<u8>],
        done: Vec<Vec<u8>>,
    ) -> Result<(), Error> {
        let now = self.now().to_be_bytes();
        for envelope_id in taken {
            self.store
                .put(Tree::State, &seen_key(inbox, envelope_id), &now)?;
        }
        self.store.flush()?;
        self.ack(inbox, done).await
    }

    pub(crate) fn already_seen(&self, inbox: &Inbox, envelope_id: &[u8]) -> Result<bool, Error> {
        Ok(self
            .store
            .get(Tree::State, &seen_key(inbox, envelope_id))?
            .is_some())
    }

    /// Forgets envelope ids older than any envelope the relay may still hold;
    /// at most once an hour (it reads every remembered id).
    pub(crate) fn prune_seen(&self) -> Result<(), Error> {
        let now = self.now();
        let last = self.last_prune.load(std::sync::atomic::Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < PRUNE_EVERY_SECONDS {
            return Ok(());
        }
        self.last_prune
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let oldest = now.saturating_sub(SEEN_FOR_SECONDS);
        self.prune_pending_sync(oldest)?;
        for (key, value) in self.store.scan_prefix(Tree::State, SEEN_PREFIX)? {
            let at = value.as_slice().try_into().map_or(0, u64::from_be_bytes);
            if at < oldest {
                self.store.remove(Tree::State, &key)?;
            }
        }
        Ok(())
    }

    /// Fetches everything waiting for this device (sync, intake and
    /// conversation mailboxes), decrypts it, stores the new state, and only then
    /// acknowledges it. What an app calls when woken in the background.
    ///
    /// Envelopes that earlier calls queued but could not post are posted first.
    /// Each mailbox is synced on its own: one that fails is tried again next
    /// time while the others go on, and the call fails only when none synced.
    /// Envelopes refused for their contents come back as
    /// [`Event::EnvelopeRefused`].
    pub async fn sync_once(&self) -> Result<Vec<Event>, Error> {
        let _state = self.state_lock.lock().await;
        self.prune_seen()?;
        // What earlier calls could not post goes out first; a relay that is
        // unreachable fails the fetches below as well, so this needs no tally.
        if let Err(error) = self.post_all_queued().await {
            tracing::debug!(%error, "queued envelopes were not posted");
        }
        let mut events = Vec::new();
        let mut tally = Tally::default();
        for inbox in self.sibling_inboxes()? {
            tally.record(
                self.drain(&inbox, Source::Siblings, &mut events)
                    .await
                    .map(|_| ()),
            );
        }
        // Weekly prekey rotation rides on the normal sync (a no-op without device
        // keys); a failed upload is retried next time (it is not a mailbox: no
        // tally). After the sibling mailboxes: a link completed there lists this
        // device, and its first upload goes now.
        if let Err(error) = self.keep_prekeys_fresh(false).await {
            tracing::debug!(%error, "rotated prekeys were not uploaded");
        }
        // What the device holding the supporter key passes on between its
        // other devices goes out now, not with the next sync.
        if self.supporter_key()?.is_some()
            && let Err(error) = self.post_queued(Owner::Siblings).await
        {
            tracing::debug!(%error, "copies for sibling devices were not posted");
        }
        if let Some(intake) = self.intake_inbox()? {
            let before = events.len();
            tally.record(
                self.drain(&intake, Source::Intake, &mut events)
                    .await
                    .map(|_| ()),
            );
            // Help-seekers this device turned away hear it now.
            if let Err(error) = self.post_queued(Owner::Notices).await {
                tracing::debug!(%error, "notices to declined help-seekers were not posted");
            }
            if events[before..].iter().any(|event| {
                matches!(
                    event,
                    Event::ConversationStarted { .. } | Event::FirstContactDeclined
                )
            }) {
                // First contacts used one-time prekeys: top them up; and the
                // relay learns how much room is left.
                tally.record(self.replenish_prekeys_unlocked().await.map(|_| ()));
                tally.record(self.refresh_relay_capacity().await);
            }
        }
        // Claims whose help-seeker never wrote took capacity on the relay:
        // given back every few minutes (not a mailbox: no tally).
        if let Err(error) = self.refresh_relay_capacity_if_due().await {
            tracing::debug!(%error, "the relay was not told this device's room");
        }
        let mut ids = self.conversation_ids()?;
        rand::seq::SliceRandom::shuffle(&mut ids[..], &mut rand::rng());
        let spread = self.sync_spread();
        let pause = spread / u32::try_from(ids.len().max(1)).unwrap_or(u32::MAX);
        for (n, id) in ids.into_iter().enumerate() {
            if n > 0 && !pause.is_zero() {
                let millis = rand::random_range(0..=pause.as_millis() as u64);
                tokio::time::sleep(std::time::Duration::from_millis(millis)).await;
            }
            let links = match self.conversation(&id) {
                Ok(conversation) => conversation.links,
                Err(error) => {
                    tally.record(Err(error));
                    continue;
                }
            };
            for link in &links {
                let source = Source::Conversation(id, link.inbox.recipient_id);
                let ended = match self.drain(&link.inbox, source, &mut events).await {
                    Ok(ended) => {
                        tally.record(Ok(()));
                        ended
                    }
                    Err(error) => {
                        tally.record(Err(error));
                        false
                    }
                };
                if ended && self.conversation(&id).is_err() {
                    // Its mailboxes are gone with the conversation.
                    break;
                }
            }
        }
        if events
            .iter()
            .any(|event| matches!(event, Event::ConversationEnded { .. }))
        {
            // A place may have opened up (a no-op unless this device holds the supporter key).
            tally.record(self.refresh_relay_capacity().await);
        }
        let mut events = tally.finish(events)?;
        // Messages shown as pending that failed since (here or in a send),
        // taken only now that the events reach the app.
        let mut failed = self.take_failed_sends()?;
        failed.append(&mut events);
        Ok(failed)
    }

    /// Reads one mailbox, page by page (at most [`PAGES_PER_SYNC`]), handing
    /// each new envelope to what `source` says, and acknowledging each page
    /// once what it changed is on disk. Returns whether the conversation ended
    /// (its mailbox is then deleted, so nothing more is read or acknowledged).
    async fn drain(
        &self,
        inbox: &Inbox,
        source: Source,
        events: &mut Vec<Event>,
    ) -> Result<bool, Error> {
        let mut refused = 0usize;
        for _ in 0..PAGES_PER_SYNC {
            let (envelopes, more) = self.fetch(inbox).await?;
            let mut done = Vec::with_capacity(envelopes.len());
            let mut taken = Vec::with_capacity(envelopes.len());
            for envelope in envelopes {
                if self.already_seen(inbox, &envelope.envelope_id)? {
                    done.push(envelope.envelope_id);
                    continue;
                }
                match self.handle(inbox, source, &envelope.ciphertext).await {
                    Ok(new) => {
                        taken.push(envelope.envelope_id.clone());
                        let ended = new.iter().any(|event| {
                            matches!(
                                event,
                                Event::ConversationEnded { .. }
                                    | Event::ConversationDeclined { .. }
                            )
                        });
                        // A message that said nothing to show may have dropped this
                        // link (a device declining); only then is the record read again.
                        let quiet = new.is_empty();
                        events.extend(new);
                        if let Source::Conversation(id, recipient_id) = source
                            && (ended || (quiet && !self.has_link(&id, &recipient_id)))
                        {
                            // This mailbox went (with the conversation, or with
                            // the device that declined): nothing more to read.
                            self.store.flush()?;
                            return Ok(true);
                        }
                    }
                    Err(error) if error.condemns_envelope() => {
                        tracing::debug!(%error, "an envelope was refused");
                        refused += 1;
                        if refused <= MAX_REFUSALS_REPORTED {
                            events.push(Event::EnvelopeRefused {
                                conversation: match source {
                                    Source::Conversation(id, _) => Some(id),
                                    _ => None,
                                },
                                reason: error.to_string(),
                            });
                        }
                    }
                    Err(error) => {
                        self.settle(inbox, &taken, done).await?;
                        return Err(error);
                    }
                }
                done.push(envelope.envelope_id);
            }
            self.settle(inbox, &taken, done).await?;
            if !more {
                break;
            }
        }
        Ok(false)
    }

    async fn handle(
        &self,
        inbox: &Inbox,
        source: Source,
        ciphertext: &[u8],
    ) -> Result<Vec<Event>, Error> {
        match source {
            Source::Siblings => {
                let mut events = Vec::new();
                self.sibling_message(inbox, ciphertext, &mut events).await?;
                Ok(events)
            }
            Source::Intake => self.accept_first_contact(ciphertext).await,
            Source::Conversation(id, recipient_id) => {
                self.receive(&id, &recipient_id, ciphertext).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use zeroize::Zeroizing;

    use super::*;

    #[test]
    fn fetch_limits_fit_the_relays_budget_and_never_exceed_the_sdks_cap() {
        let limits = |max_envelope_bytes, max_fetch_bytes, response_overhead_bytes| {
            FetchLimits::from_relay(&proto::Limits {
                max_envelope_bytes,
                max_fetch_bytes,
                response_overhead_bytes,
                ..proto::Limits::default()
            })
        };
        // An older relay without a byte budget: the count keeps a page of the
        // largest envelopes under tonic's default limit (64 of 64 KiB would not fit).
        let old = limits(64 * 1024, 0, 0);
        assert_eq!(old.decode_limit, 4 * 1024 * 1024);
        assert!(u64::from(old.count) * (64 * 1024 + 1024) <= 4 * 1024 * 1024 - 1024);
        assert!(old.count >= 32);
        // A relay with a budget: room for the budget and one envelope past it.
        let budgeted = limits(64 * 1024, 1024 * 1024, 512);
        assert_eq!(
            budgeted.decode_limit,
            4 * 1024 * 1024,
            "at least tonic's default"
        );
        // A hostile relay publishing a huge budget gets the SDK's cap.
        let huge = limits(u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(huge.decode_limit as u64, MAX_DECODE_LIMIT);
        assert_eq!(huge.count, 1);
    }

    #[tokio::test]
    async fn envelope_ids_are_remembered_then_forgotten_after_any_relay_would_drop_them()
    -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Storage(e.to_string()))?;
        let client = crate::offline_client(dir.path(), None)?;
        let inbox = Inbox {
            recipient_id: [3; 16],
            sender_id: [4; 16],
            key: Zeroizing::new([5; 32]),
            lane: crate::transport::Lane::Device,
        };
        assert!(!client.already_seen(&inbox, &[6; 16])?);
        let recent = client.now().to_be_bytes();
        let ancient = client
            .now()
            .saturating_sub(SEEN_FOR_SECONDS + 1)
            .to_be_bytes();
        client
            .store
            .put(Tree::State, &seen_key(&inbox, &[6; 16]), &recent)?;
        client
            .store
            .put(Tree::State, &seen_key(&inbox, &[7; 16]), &ancient)?;
        assert!(client.already_seen(&inbox, &[6; 16])? && client.already_seen(&inbox, &[7; 16])?);
        client.prune_seen()?;
        assert!(
            client.already_seen(&inbox, &[6; 16])?,
            "recent ids are kept"
        );
        assert!(
            !client.already_seen(&inbox, &[7; 16])?,
            "old ids are forgotten"
        );
        Ok(())
    }
}
