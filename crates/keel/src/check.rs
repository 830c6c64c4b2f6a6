//! `keel check`: validates a config file without starting anything.

use std::path::Path;
use std::process::ExitCode;

/// Checks `config`: "FILE: ok", or every error and exit code 2.
pub fn run(config: &Path) -> ExitCode {
    match keel_config::load(config) {
        Ok(_) => {
            println!("{}: ok", config.display());
            ExitCode::SUCCESS
        }
        Err(errors) => crate::report_config_errors(&errors),
    }
}
