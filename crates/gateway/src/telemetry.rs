//! Logging setup: `tracing` to stdout, text or JSON, level from `RUST_LOG`
//! when set, else from the config.

use tracing_subscriber::EnvFilter;

use keel_config::{LogFormat, LogSpec};

/// Installs the global subscriber (once per process).
pub fn init(config: &LogSpec) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    if let Err(error) = result {
        eprintln!("keel: logging already initialised: {error}");
    }
}
