//! The expiry sweeper: on an interval, deletes expired envelopes, destroys
//! the at-rest keys of passed buckets and deletes idle mailboxes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_store::MailboxStore;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::relay::now_ms;
use crate::telemetry;

/// Sweeps every `interval` (the first sweep runs at once) until `shutdown`.
pub async fn run(store: Arc<dyn MailboxStore>, interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let started = Instant::now();
        let result = store.sweep(now_ms() / 1000).await;
        telemetry::record_sweep(&result, started.elapsed());
        match result {
            Ok(report) => tracing::debug!(
                expired = report.expired_envelopes,
                shredded_buckets = report.shredded_buckets,
                expired_mailboxes = report.expired_mailboxes,
                micros = started.elapsed().as_micros() as u64,
                "sweep done"
            ),
            Err(error) => tracing::error!(%error, "sweep failed"),
        }
    }
}
