//! Runs the conformance suite against every backend that runs in-process.
#![allow(clippy::expect_used, clippy::unwrap_used)] // reason: test helpers; a failed expect is a failed test.

use std::sync::Arc;

use haven_store::{MemoryStore, SledConfig, SledStore, Store, conformance};

mod memory {
    use super::*;
    haven_store::conformance_suite!(async {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(conformance::config()));
        (store, ())
    });
}

mod sled {
    use super::*;
    haven_store::conformance_suite!(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = SledConfig::new(dir.path());
        config.store = conformance::config();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(config).expect("open sled"));
        (store, dir)
    });
}
