//! The keel gateway's configuration: the TOML file's schema, its units
//! and defaults, the checks `keel check` runs, and the typed [`Spec`] the
//! gateway is built from.
//!
//! [`load`] and [`parse`] run every check first; every error names
//! `FILE:LINE:COL` so an editor can jump to it (syntax and schema errors
//! take the span toml reports, semantic errors such as an unknown upstream
//! or a bad URL the span of the offending value). Only a file that passes
//! them all is converted, once, into a [`Spec`]: plain Rust values
//! (`SocketAddr`, `Duration`, byte counts, `http::Method`s, header names,
//! enums carrying their own fields, routes pointing at their upstream by
//! index) with every default filled in. Runtime code reads the spec and
//! never sees a TOML type; the raw serde schema ([`schema`]) stays inside
//! this crate's checks (it is public for tests and the fuzz target).
//!
//! ```
//! use std::time::Duration;
//!
//! let spec = keel_config::parse(
//!     std::path::Path::new("keel.toml"),
//!     "[server]\nlisten = \"127.0.0.1:8080\"\n\
//!      [upstreams.app]\nendpoints = [\"http://127.0.0.1:3000\"]\n\
//!      [[routes]]\npath_prefix = \"/\"\nupstream = \"app\"\n",
//! )
//! .expect("a valid config");
//! assert_eq!(spec.server.listen, "127.0.0.1:8080".parse().expect("addr"));
//! assert_eq!(spec.server.idle_timeout, Duration::from_secs(60));
//! let app = spec.upstream_of(&spec.routes[0]);
//! assert_eq!(app.endpoints[0].authority, "127.0.0.1:3000");
//! ```

mod check;
mod convert;
pub mod schema;
mod spec;
pub mod units;

pub use check::MAX_WORKERS;
pub use spec::{
    BreakerSpec, DrainPace, DrainSpec, EndpointSpec, HealthCheckSpec, IdempotencySpec,
    LapsedLeasePolicy, LoadBalancing, LogFormat, LogSpec, MissingTenantPolicy, RetrySpec,
    RouteSpec, ServerErrorsPolicy, ServerSpec, Spec, StaleSpec, StoreBackend, StoreSpec,
    UpstreamSpec,
};

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::DeTable;

/// A config error with its place in the file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// What is wrong and, where possible, what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Turns a byte offset into a 1-based line and column.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Reads a config file, checks it, and turns it into a [`Spec`].
pub fn load(file: &Path) -> Result<Spec, Vec<ConfigError>> {
    let source = std::fs::read_to_string(file).map_err(|e| {
        vec![ConfigError {
            file: file.to_owned(),
            line: 1,
            col: 1,
            message: format!("cannot read the config file: {e}"),
        }]
    })?;
    parse(file, &source)
}

/// Parses and checks config text and turns it into a [`Spec`]; `file` is
/// only used in messages. Every error in the text is reported, each at its
/// `FILE:LINE:COL`. Never panics, whatever the text (fuzzed: `fuzz/`).
pub fn parse(file: &Path, source: &str) -> Result<Spec, Vec<ConfigError>> {
    let syntax_error = |e: toml::de::Error| {
        let (line, col) = e.span().map_or((1, 1), |span| line_col(source, span.start));
        vec![ConfigError {
            file: file.to_owned(),
            line,
            col,
            message: e.message().trim().to_owned(),
        }]
    };
    let doc = DeTable::parse(source).map_err(syntax_error)?;
    let config = schema::Config::deserialize(toml::de::Deserializer::from(doc.clone()))
        .map_err(syntax_error)?;
    let mut checker = check::Checker {
        file,
        source,
        doc: doc.get_ref(),
        errors: Vec::new(),
    };
    // The checks hand on what they parsed: `Some` whenever they recorded
    // no error, so the conversion has nothing left that could fail.
    match check::validate(&config, &mut checker) {
        Some(checked) if checker.errors.is_empty() => Ok(convert::spec(config, checked)),
        _ => Err(checker.errors),
    }
}
