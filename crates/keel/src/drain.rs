//! `keel drain`: drains a running gateway, or one upstream endpoint, over
//! its admin API and follows the progress until it is done.

use std::time::Duration;

use keel_admin::DrainPhase as Phase;

/// What `keel drain` drains.
#[derive(Debug, Clone)]
pub enum Target {
    /// The whole gateway (its shutdown sequence).
    Gateway,
    /// One endpoint of one upstream; `resume` puts it back in service
    /// instead.
    Endpoint {
        /// Upstream name.
        upstream: String,
        /// Endpoint URL as configured.
        endpoint: String,
        /// Resume instead of drain.
        resume: bool,
    },
}

/// Errors of `keel drain`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin API could not be reached, or refused.
    #[error(transparent)]
    Admin(#[from] keel_admin::StatusError),
}

/// `keel drain`: starts a drain on a running gateway and follows its
/// progress until it is done, with a progress bar when `tty`.
pub async fn run(admin: &str, target: Target, tty: bool) -> Result<(), Error> {
    let mut seen_draining = false;
    let endpoint = match &target {
        Target::Gateway => {
            keel_admin::start_drain(admin).await?;
            // From now on, an admin API that stops answering means the
            // gateway finished its drain and exited.
            seen_draining = true;
            None
        }
        Target::Endpoint {
            upstream,
            endpoint,
            resume,
        } => {
            if *resume {
                keel_admin::resume_endpoint(admin, upstream, endpoint).await?;
                println!("{upstream} {endpoint}: back in service");
                return Ok(());
            }
            keel_admin::drain_endpoint(admin, upstream, endpoint).await?;
            Some((upstream.clone(), endpoint.clone()))
        }
    };
    let started = std::time::Instant::now();
    let mut last_line = String::new();
    let mut last_print = std::time::Instant::now() - Duration::from_secs(10);
    loop {
        let report = match keel_admin::fetch_drain(admin).await {
            Ok(report) => report,
            // The gateway exits when its drain is over.
            Err(_) if endpoint.is_none() && seen_draining => break,
            Err(error) => return Err(error.into()),
        };
        let (phase, progress) = match &endpoint {
            None => (report.phase, report.tunnels),
            Some((upstream, url)) => (
                Phase::Draining,
                report
                    .endpoints
                    .iter()
                    .find(|e| e.upstream == *upstream && e.endpoint == *url)
                    .map(|e| e.progress),
            ),
        };
        seen_draining |= matches!(phase, Phase::Draining | Phase::Done);
        let line =
            keel_admin::progress_line(phase.as_str(), progress.as_ref(), started.elapsed(), tty);
        if tty {
            eprint!("\r{line}\x1b[K");
        } else if line != last_line && last_print.elapsed() >= Duration::from_secs(1) {
            println!("{line}");
            last_print = std::time::Instant::now();
            last_line = line.clone();
        }
        let done = phase == Phase::Done || progress.is_some_and(|p| p.done);
        if done {
            if tty {
                eprintln!();
            } else if line != last_line {
                println!("{line}");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(if tty { 100 } else { 250 })).await;
    }
    println!("drain done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}
