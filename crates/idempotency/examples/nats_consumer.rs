//! A JetStream consumer that processes each message once, even when the
//! broker redelivers it.
//!
//! ```text
//! nats-server -js &                                   # or KEEL_TEST_NATS_URL=...
//! cargo run -p keel-idempotency --example nats_consumer
//! ```
//!
//! It publishes one "charge" message, then consumes it. The first delivery
//! is processed but not acknowledged (as if the consumer crashed just
//! before the ack), so JetStream redelivers it after `ack_wait`. The
//! redelivery finds the event id recorded by `process_once` and is
//! acknowledged without charging again. The stream is deleted at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt;
use keel_idempotency::consumer::{Consumer, Processed};
use keel_idempotency::memory::MemoryStore;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url =
        std::env::var("KEEL_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let charges = Arc::new(AtomicUsize::new(0));
    let deliveries = redelivered_once(&url, charges.clone()).await?;
    println!(
        "deliveries: {deliveries}, charges: {}",
        charges.load(Ordering::SeqCst)
    );
    Ok(())
}

/// Publishes one message and consumes it until it has been delivered twice
/// and acknowledged; returns the number of deliveries. `charges` counts
/// the handler's runs.
async fn redelivered_once(url: &str, charges: Arc<AtomicUsize>) -> Result<u64, Error> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let name = format!("KEEL_IDEM_EXAMPLE_{}_{nanos}", std::process::id());
    let subject = format!("keel.idem.example.{nanos}");
    let stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    js.publish(subject, "charge order 42: 10 EUR".into())
        .await?
        .await?;

    let consumer = stream
        .create_consumer(pull::Config {
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await?;
    let dedup = Consumer::new(Arc::new(MemoryStore::new())).namespace(name.clone());
    let mut messages = consumer.messages().await?;
    let mut deliveries = 0;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let (event_id, delivered) = {
            let info = msg.info()?;
            (
                format!("{}:{}", info.stream, info.stream_sequence),
                info.delivered,
            )
        };
        deliveries += 1;
        let charges = charges.clone();
        let outcome = dedup
            .process_once(&event_id, Duration::from_secs(3600), async move {
                charges.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Error>(())
            })
            .await?;
        println!("delivery {delivered} of {event_id}: {outcome:?}");
        match outcome {
            // Simulate a crash between the work and the ack on the first
            // delivery: JetStream will redeliver.
            Processed::Ran(()) if delivered == 1 => continue,
            Processed::InFlight { retry_after } => {
                msg.ack_with(jetstream::AckKind::Nak(Some(retry_after)))
                    .await?;
                continue;
            }
            _ => {
                msg.ack().await?;
                break;
            }
        }
    }
    js.delete_stream(&name).await?;
    Ok(deliveries)
}
