//! How a gateway uses keel-breaker: one breaker per upstream and one per
//! endpoint in a registry, handles resolved once, a 503 with `Retry-After`
//! when a breaker rejects, a dependency's `Retry-After` fed back as the
//! open duration, operator overrides, and the `/status` JSON.
//!
//! Run: `cargo run -p keel-breaker --example registry`

use keel_breaker::{Config, Outcome, Registry};
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = Registry::new(Config::fuse(
        2,
        Duration::from_secs(10),
        Duration::from_secs(5),
    ));
    let mut events = registry.subscribe();

    // Resolved once, when routes are built: the request path holds handles.
    let upstream = registry.get_or_insert("app")?;
    let endpoint = registry.get_or_insert("app/http://127.0.0.1:3000")?;

    // Three 503s from the endpoint, the last with `Retry-After: 30`.
    for retry_after in [None, None, Some(Duration::from_secs(30))] {
        let permit = endpoint.allow()?;
        permit.record(match retry_after {
            Some(d) => Outcome::FailureRetryAfter(d),
            None => Outcome::Failure,
        });
    }
    match endpoint.allow() {
        Ok(_) => println!("endpoint still closed"),
        Err(rejected) => {
            let secs = rejected.retry_after_secs().unwrap_or(1);
            println!("endpoint: 503, Retry-After: {secs} ({rejected})");
        }
    }
    assert!(upstream.allow().is_ok(), "the upstream breaker is separate");

    // Operator overrides (POST /breakers/{name}/{melt,reset,disable,enable}).
    endpoint.reset();
    upstream.disable();
    upstream.enable();

    println!("{}", serde_json::to_string_pretty(&registry.snapshot())?);
    while let Ok(e) = events.try_recv() {
        println!("event: {}", serde_json::to_string(&e)?);
    }
    Ok(())
}
