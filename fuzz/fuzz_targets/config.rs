//! Fuzz target: keel's config loader (`config::parse`, the TOML schema and
//! every check `keel check` runs) on arbitrary UTF-8 never panics, and each
//! error it reports has a place in the text.
//!
//! keel is a binary crate, so its modules are compiled here from
//! `crates/keel/src` (the config checks reach the resilience, store and
//! drain settings, which reach most of the crate). Run with
//! `cargo +nightly fuzz run config` from the repository root (fuzz/README.md).
#![no_main]
#![allow(
    dead_code,
    unused_imports,
    reason = "only the config loader is driven; the rest of keel is compiled for it"
)]

#[path = "../../crates/keel/src/admin.rs"]
mod admin;
#[path = "../../crates/keel/src/body.rs"]
mod body;
#[path = "../../crates/keel/src/config.rs"]
mod config;
#[path = "../../crates/keel/src/demo.rs"]
mod demo;
#[path = "../../crates/keel/src/demo_ws.rs"]
mod demo_ws;
#[path = "../../crates/keel/src/drain.rs"]
mod drain;
#[path = "../../crates/keel/src/headers.rs"]
mod headers;
#[path = "../../crates/keel/src/idempotency.rs"]
mod idempotency;
#[path = "../../crates/keel/src/listener.rs"]
mod listener;
#[path = "../../crates/keel/src/metrics.rs"]
mod metrics;
#[path = "../../crates/keel/src/problem.rs"]
mod problem;
#[path = "../../crates/keel/src/proxy.rs"]
mod proxy;
#[path = "../../crates/keel/src/readiness.rs"]
mod readiness;
#[path = "../../crates/keel/src/resilience/mod.rs"]
mod resilience;
#[path = "../../crates/keel/src/route.rs"]
mod route;
#[path = "../../crates/keel/src/serve.rs"]
mod serve;
#[path = "../../crates/keel/src/store.rs"]
mod store;
#[path = "../../crates/keel/src/supervision.rs"]
mod supervision;
#[path = "../../crates/keel/src/telemetry.rs"]
mod telemetry;
#[path = "../../crates/keel/src/tunnel.rs"]
mod tunnel;
#[path = "../../crates/keel/src/units.rs"]
mod units;
#[path = "../../crates/keel/src/upstream.rs"]
mod upstream;

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = config::parse(Path::new("fuzz.toml"), text) {
        assert!(!errors.is_empty(), "an error list is never empty");
        let lines = text.split('\n').count();
        for error in &errors {
            assert!(
                error.line >= 1 && error.line <= lines && error.col >= 1,
                "{error} is outside the text"
            );
        }
    }
});
