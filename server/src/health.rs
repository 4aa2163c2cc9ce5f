//! Health that follows the store (review F17): after a failure that stops the
//! store for good (the sled backend's sticky log error, say on a full disk),
//! every write fails, so the relay says NOT_SERVING, shows it in
//! `haven_store_failed`, and after `store_failure_exit_seconds` exits with an
//! error so that systemd or Kubernetes restarts it.

use std::sync::Arc;
use std::time::Duration;

use haven_store::MailboxStore;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;

use crate::telemetry;

/// How often the store is asked; the answer is a cached flag, so this is cheap.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Watches `store` until `stop`; on a fatal error turns `health` NOT_SERVING
/// and cancels `failed`.
pub async fn watch(
    store: Arc<dyn MailboxStore>,
    health: HealthReporter,
    failed: CancellationToken,
    stop: CancellationToken,
) {
    telemetry::store_failed(false);
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Some(error) = store.fatal_error() {
            tracing::error!(
                %error,
                "the store failed and takes no more writes: NOT_SERVING, exiting for a restart \
                 after store_failure_exit_seconds"
            );
            telemetry::store_failed(true);
            crate::grpc::set_not_serving(&health).await;
            failed.cancel();
            return;
        }
    }
}
