//! Push wake-ups: the relay POSTs a content-free wake-up to an endpoint when
//! something arrives for a mailbox no stream watches, and the app, woken,
//! calls [`Client::sync_once`].
//!
//! One endpoint and token standing beside several mailboxes tell the relay
//! that those mailboxes belong to one device. For a supporter's mailboxes
//! (intake, sync, the conversations they answer) that says nothing new, so
//! [`Client::register_push`] covers them all, including ones created later.
//! A help-seeker's conversations must stay unlinkable to each other, so they
//! are never covered by it: each gets its own registration with
//! [`Client::register_conversation_push`] (a UnifiedPush instance, or a
//! gateway token, per conversation), or none, and the app syncs when it opens.
//! docs/mobile.md says more.

use ed25519_dalek::SigningKey;
use haven_proto::auth::{Method, sign_request};
use haven_proto::v1 as proto;

use crate::conversation::Inbox;
use crate::storage::Tree;
use crate::{Client, Error};

const PUSH: &[u8] = b"push";

impl Client {
    /// Registers `endpoint` (a UnifiedPush endpoint, or the app vendor's push
    /// gateway, https) with `token` (opaque bytes the wake-up carries: for a
    /// gateway, the APNs/FCM token it forwards to) for this device's supporter
    /// mailboxes — intake, sync, and the conversations it answers — now and
    /// later. Replaces an earlier registration. A help-seeker's conversations
    /// are not covered: see [`Client::register_conversation_push`].
    pub async fn register_push(&self, endpoint: &str, token: &[u8]) -> Result<(), Error> {
        if endpoint.is_empty() {
            return Err(Error::InvalidArgument(
                "a push endpoint is needed; use unregister_push to stop wake-ups".into(),
            ));
        }
        let _state = self.state_lock.lock().await;
        let record = [
            &(endpoint.len() as u32).to_be_bytes()[..],
            endpoint.as_bytes(),
            token,
        ]
        .concat();
        self.store.put(Tree::State, PUSH, &record)?;
        self.store.flush()?;
        for inbox in self.supporter_inboxes()? {
            self.register_push_for(&inbox, endpoint, token).await?;
        }
        Ok(())
    }

    /// Stops the wake-ups [`Client::register_push`] set up.
    pub async fn unregister_push(&self) -> Result<(), Error> {
        let _state = self.state_lock.lock().await;
        self.store.remove(Tree::State, PUSH)?;
        self.store.flush()?;
        for inbox in self.supporter_inboxes()? {
            self.register_push_for(&inbox, "", &[]).await?;
        }
        Ok(())
    }

    /// Registers `endpoint` and `token` for one conversation's mailboxes only
    /// (an empty endpoint removes it). Give each of a help-seeker's
    /// conversations its own (a UnifiedPush instance per conversation, or a
    /// gateway token per conversation): shared ones let the relay see that the
    /// conversations are on one phone.
    pub async fn register_conversation_push(
        &self,
        id: &crate::ConversationId,
        endpoint: &str,
        token: &[u8],
    ) -> Result<(), Error> {
        if endpoint.is_empty() && !token.is_empty() {
            return Err(Error::InvalidArgument(
                "a token without an endpoint; an empty endpoint and token remove the registration"
                    .into(),
            ));
        }
        let _state = self.state_lock.lock().await;
        for link in self.conversation(id)?.links {
            self.register_push_for(&link.inbox, endpoint, token).await?;
        }
        Ok(())
    }

    /// The mailboxes [`Client::register_push`] covers: intake, sync, and the
    /// conversations this device answers as a supporter.
    fn supporter_inboxes(&self) -> Result<Vec<Inbox>, Error> {
        self.inboxes_of(|conversation| !conversation.help_seeker)
    }

    /// The device's registration, if any: (endpoint, token).
    fn push_registration(&self) -> Result<Option<(String, Vec<u8>)>, Error> {
        let Some(record) = self.store.get(Tree::State, PUSH)? else {
            return Ok(None);
        };
        let malformed = || Error::Storage("the stored push registration is malformed".into());
        let len = u32::from_be_bytes(
            record
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(malformed)?,
        ) as usize;
        let endpoint = record.get(4..4 + len).ok_or_else(malformed)?;
        let endpoint = String::from_utf8(endpoint.to_vec()).map_err(|_| malformed())?;
        Ok(Some((endpoint, record[4 + len..].to_vec())))
    }

    /// Registers the device's push endpoint, if it has one, for a new mailbox.
    /// Best effort: a mailbox without wake-ups still works through `sync_once`,
    /// so a refusal here must not fail the conversation that needs the mailbox.
    pub(crate) async fn push_for_new(&self, inbox: &Inbox) -> Result<(), Error> {
        if let Some((endpoint, token)) = self.push_registration()?
            && let Err(error) = self.register_push_for(inbox, &endpoint, &token).await
        {
            tracing::warn!(%error, "a new mailbox could not be registered for push wake-ups");
        }
        Ok(())
    }

    async fn register_push_for(
        &self,
        inbox: &Inbox,
        endpoint: &str,
        token: &[u8],
    ) -> Result<(), Error> {
        let signing = SigningKey::from_bytes(&inbox.key);
        let auth = sign_request(
            &signing,
            Method::RegisterPush,
            &inbox.recipient_id,
            &[endpoint.as_bytes(), token],
            self.now_ms(),
            rand::random(),
        );
        self.transport
            .mailbox(inbox.lane)
            .register_push(proto::RegisterPushRequest {
                recipient_id: inbox.recipient_id.to_vec(),
                endpoint: endpoint.to_owned(),
                token: token.to_vec(),
                auth: Some(auth),
            })
            .await?;
        Ok(())
    }
}
