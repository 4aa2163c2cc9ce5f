//! The live event stream: while the app is in the foreground, `Receive` streams
//! on every mailbox of this device act as wake-up signals; each signal runs one
//! `sync_once`, whose events the app reads. Streams that fail are reopened with
//! exponential backoff (1 s up to 30 s); the mailbox set is refreshed after
//! every sync, so new conversations are watched too.

use std::sync::Arc;
use std::time::Duration;

use haven_proto::auth::{Method, sign_request};
use haven_proto::v1 as proto;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

use crate::conversation::{Event, Inbox};
use crate::{Client, Error};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Even without a signal, sync this often (a wake-up can be lost while a stream reconnects).
const RESYNC: Duration = Duration::from_secs(30);

/// Events as they happen. Dropping it stops watching.
pub struct EventStream {
    receiver: mpsc::Receiver<Result<Event, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventStream {
    /// The next event, or an error the app may show (the stream keeps going
    /// after errors, retrying with backoff). `None` only if the client is gone.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        self.receiver.recv().await
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventStream(..)")
    }
}

impl Client {
    /// Starts watching every mailbox of this device; see the module documentation.
    pub fn events(self: &Arc<Self>) -> EventStream {
        let (sender, receiver) = mpsc::channel(64);
        let client = Arc::clone(self);
        let task = tokio::spawn(async move { client.event_loop(sender).await });
        EventStream { receiver, task }
    }

    async fn event_loop(&self, events: mpsc::Sender<Result<Event, Error>>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.sync_once().await {
                Ok(new) => {
                    backoff = FIRST_BACKOFF;
                    for event in new {
                        if events.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(error) => {
                    if events.send(Err(error)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
            let inboxes = match self.inboxes() {
                Ok(inboxes) => inboxes,
                Err(error) => {
                    let _ = events.send(Err(error)).await;
                    return;
                }
            };
            let (signal, mut signals) = mpsc::channel::<()>(inboxes.len() + 1);
            let mut watchers = JoinSet::new();
            for inbox in inboxes {
                let transport = self.transport.clone();
                let timestamp = self.now_ms();
                let signal = signal.clone();
                watchers.spawn(async move { watch(transport, inbox, timestamp, signal).await });
            }
            drop(signal);
            tokio::select! {
                _ = signals.recv() => {}
                Some(_) = watchers.join_next() => {
                    // A stream ended (relay restarting, network gone): back off, then resync.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                () = tokio::time::sleep(RESYNC) => {}
                () = events.closed() => return,
            }
            watchers.abort_all();
        }
    }
}

/// Holds a `Receive` stream on one mailbox and signals when anything arrives.
/// It never acknowledges on the stream: `sync_once` fetches, stores and acks,
/// and an ack here could delete an envelope before that fetch. With a window of
/// one the stream pauses after its first envelope; the loop then reopens it.
async fn watch(
    transport: crate::transport::Transport,
    inbox: Inbox,
    timestamp_ms: u64,
    signal: mpsc::Sender<()>,
) {
    let key = ed25519_dalek::SigningKey::from_bytes(&inbox.key);
    let window = 1u32;
    let auth = sign_request(
        &key,
        Method::Receive,
        &inbox.recipient_id,
        &[&window.to_be_bytes()],
        timestamp_ms,
        rand::random(),
    );
    let (outgoing, requests) = mpsc::channel(1);
    let open = proto::ReceiveRequest {
        kind: Some(proto::receive_request::Kind::Open(proto::ReceiveOpen {
            recipient_id: inbox.recipient_id.to_vec(),
            window,
            auth: Some(auth),
        })),
    };
    if outgoing.send(open).await.is_err() {
        return;
    }
    let Ok(response) = transport
        .mailbox(inbox.lane)
        .receive(ReceiverStream::new(requests))
        .await
    else {
        return;
    };
    let mut inbound = response.into_inner();
    while let Ok(Some(message)) = inbound.message().await {
        if let Some(proto::receive_response::Kind::Envelope(_)) = message.kind {
            let _ = signal.send(()).await;
            return;
        }
    }
    // Keep the request side open until the stream ends, so the relay does not
    // take a closed request stream for the end of the conversation.
    drop(outgoing);
}
