//! `process_once` against a real NATS JetStream: a message redelivered
//! because its first delivery was never acknowledged is processed once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt;
use keel_idempotency::consumer::{Consumer, Processed};
use keel_idempotency::memory::MemoryStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_message_is_processed_once() {
    let Some(url) = keel_testkit::service_url(keel_testkit::NATS) else {
        return;
    };
    let client = async_nats::connect(&url).await.expect("connect to NATS");
    let js = jetstream::new(client);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let name = format!("KEEL_IDEM_TEST_{}_{nanos}", std::process::id());
    let subject = format!("keel.idem.test.{nanos}");
    let stream = js
        .get_or_create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .expect("JetStream enabled (nats-server -js)");
    for i in 0..3 {
        js.publish(subject.clone(), format!("event {i}").into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let consumer = stream
        .create_consumer(pull::Config {
            ack_wait: Duration::from_millis(500),
            ..Default::default()
        })
        .await
        .expect("consumer");
    // Two consumer instances share one store, as two replicas would.
    let store = Arc::new(MemoryStore::new());
    let replicas = [
        Consumer::new(store.clone()).namespace(name.clone()),
        Consumer::new(store).namespace(name.clone()),
    ];
    let runs = Arc::new(AtomicUsize::new(0));
    let mut acked = 0;
    let mut duplicates = 0;
    let mut messages = consumer.messages().await.expect("messages");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while acked < 3 {
        let msg = tokio::time::timeout_at(deadline, messages.next())
            .await
            .expect("messages arrive")
            .expect("stream open")
            .expect("message");
        let info = msg.info().expect("JetStream message");
        let (event_id, delivered) = (
            format!("{}:{}", info.stream, info.stream_sequence),
            info.delivered,
        );
        let replica = &replicas[usize::try_from(delivered).expect("small") % 2];
        let r = runs.clone();
        let outcome = replica
            .process_once(&event_id, Duration::from_secs(600), async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            })
            .await
            .expect("store up");
        match outcome {
            // First delivery: processed, "crash" before the ack.
            Processed::Ran(()) if delivered == 1 => {}
            Processed::Duplicate => {
                assert!(delivered >= 2);
                duplicates += 1;
                msg.ack().await.expect("ack");
                acked += 1;
            }
            other => panic!("delivery {delivered} of {event_id}: unexpected {other:?}"),
        }
    }
    js.delete_stream(&name).await.expect("cleanup");
    assert_eq!(duplicates, 3, "each message was redelivered and recognised");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "each message processed exactly once"
    );
}
