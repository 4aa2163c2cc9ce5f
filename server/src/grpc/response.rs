//! Response bytes held in memory, bounded (review H4). A `Fetch` response, or
//! an envelope queued on a `Receive` stream, stays in the relay's memory until
//! the client's HTTP/2 window lets it out; a client that never opens its
//! window used to keep about 1 MiB per unread Fetch, 256 calls per connection.
//! Now such bytes count against a budget per connection and one for the whole
//! relay, in KiB, until the response is dropped (Fetch) or handed to the
//! transport (a streamed envelope); and a connection whose responses stop
//! moving is closed after the stall timeout (`incoming`), which gives it all back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::incoming::ConnectionState;
use crate::relay::RelayError;

/// Bytes a response holds against the budgets; given back on drop. Cloneable
/// only so that it can ride in a response's extensions to the edge layer.
#[derive(Clone)]
pub struct HeldBytes {
    _permits: Arc<Permits>,
}

struct Permits {
    _relay: OwnedSemaphorePermit,
    _connection: Option<OwnedSemaphorePermit>,
}

/// The relay-wide budget of response bytes held in memory.
#[derive(Clone)]
pub struct ResponseBudget {
    /// KiB of response bytes; a permit per KiB.
    relay: Arc<Semaphore>,
    /// How long a Fetch waits for the relay-wide budget before it is refused.
    wait: Duration,
}

/// KiB, rounded up, that `bytes` count as.
pub fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl ResponseBudget {
    /// A budget of `kib` KiB for the whole relay.
    pub fn new(kib: usize, wait: Duration) -> Self {
        Self {
            relay: Arc::new(Semaphore::new(kib)),
            wait,
        }
    }

    /// Takes `bytes` for one Fetch response: from its connection's budget at
    /// once (a connection that leaves its responses unread is refused, not
    /// waited for), then from the relay's, waiting a little while other
    /// responses drain or stalled connections are closed.
    pub async fn for_fetch(
        &self,
        connection: Option<&ConnectionState>,
        bytes: u64,
    ) -> Result<HeldBytes, RelayError> {
        let kib = kib(bytes);
        let connection = match connection {
            Some(connection) => Some(
                Arc::clone(connection.responses())
                    .try_acquire_many_owned(kib)
                    .map_err(|_| {
                        RelayError::ResourceExhausted(
                            "this connection holds too many responses its client has not read; \
                             read them, or retry later"
                                .into(),
                        )
                    })?,
            ),
            None => None,
        };
        let relay =
            tokio::time::timeout(self.wait, Arc::clone(&self.relay).acquire_many_owned(kib))
                .await
                .map_err(|_| busy())?
                .map_err(|_| busy())?;
        Ok(HeldBytes {
            _permits: Arc::new(Permits {
                _relay: relay,
                _connection: connection,
            }),
        })
    }

    /// Takes `bytes` for one streamed envelope from the relay's budget,
    /// waiting as long as it takes (the stream only delivers later).
    pub async fn for_stream(&self, bytes: u64) -> Result<HeldBytes, RelayError> {
        let relay = Arc::clone(&self.relay)
            .acquire_many_owned(kib(bytes))
            .await
            .map_err(|_| busy())?;
        Ok(HeldBytes {
            _permits: Arc::new(Permits {
                _relay: relay,
                _connection: None,
            }),
        })
    }
}

fn busy() -> RelayError {
    RelayError::ResourceExhausted(
        "the relay holds too many responses not yet read by their clients; retry later".into(),
    )
}
