//! Fuzz target: keel's config loader (`keel_config::parse`, the TOML schema
//! and every check `keel check` runs) on arbitrary UTF-8 never panics, and
//! each error it reports has a place in the text.
//!
//! Run with `cargo +nightly fuzz run config` from the repository root
//! (fuzz/README.md).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = keel_config::parse(Path::new("fuzz.toml"), text) {
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
