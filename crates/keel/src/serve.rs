//! `keel serve`: runs the gateway until SIGTERM, SIGINT or `POST /drain`,
//! then drains it and exits.

use std::path::Path;
use std::process::ExitCode;

/// Loads `config` (exit code 2 when it is invalid) and serves it on as many
/// worker threads as `[server] workers` says.
pub fn run(config: &Path) -> ExitCode {
    let config = match keel_config::load(config) {
        Ok(config) => config,
        Err(errors) => return crate::report_config_errors(&errors),
    };
    keel_gateway::telemetry::init(&config.log);
    crate::run_async(config.server.workers, async move {
        keel_gateway::start(&config).await?.wait_and_drain().await?;
        Ok(())
    })
}
