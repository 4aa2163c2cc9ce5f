//! End-to-end tests of the relay: in-process on port 0 where that is enough,
//! real relay processes where a process boundary matters (restarts, kill -9,
//! signals, logs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)] // reason: tests.

mod abuse;
mod admission;
mod connections;
mod delivery;
mod directory;
mod hostile;
mod hygiene;
mod process;
mod push;
mod redis;
mod sdk;

use haven_e2e::{InProcessRelay, TestClient, test_config};

/// An in-process relay with the test configuration and a client for it.
async fn relay() -> (InProcessRelay, TestClient) {
    let relay = InProcessRelay::start(test_config())
        .await
        .expect("relay starts");
    let client = relay.client().await.expect("client connects");
    (relay, client)
}
