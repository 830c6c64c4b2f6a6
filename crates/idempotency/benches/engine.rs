//! Engine overhead per request on the memory store: a new request (parse,
//! tenant scope, fingerprint, claim, complete) and a replay (parse,
//! fingerprint, claim, decode, build the response), beside the bare store
//! pair for reference. Also a new request on the embedded store, and a
//! replay through the tower layer (buffering the request body, the engine,
//! the replayed response) in front of a `service_fn`.
//!
//! Run: `cargo bench -p keel-idempotency --bench engine`

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_idempotency::engine::{Begin, Engine, Policy};
use keel_idempotency::memory::MemoryStore;
use keel_idempotency::store::{Claim, Fingerprint, Lease, Store, StoreKey};

/// Polls a future that is ready at once (everything on the memory store).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("memory-store engine calls are ready at once"),
    }
}

const BODY: &[u8] = br#"{"amount":1000,"currency":"EUR","customer":"cus_4QFJ0sLZcU1HxR","description":"order 1234"}"#;

fn request(key: &str) -> http::Request<()> {
    http::Request::post("/v1/charges?expand=customer")
        .header("authorization", "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc")
        .header("idempotency-key", key)
        .header("x-request-id", "2c9f3f5e-0b7a-4a3c-9d55-2f0c1b7a9e11")
        .header("content-type", "application/json")
        .body(())
        .expect("request")
}

fn response() -> http::Response<Bytes> {
    http::Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .header("location", "/v1/charges/ch_1")
        .body(Bytes::from_static(
            br#"{"id":"ch_1","amount":1000,"currency":"EUR","status":"succeeded"}"#,
        ))
        .expect("response")
}

fn engine_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));

    // Zero TTL: each record is expired by the time its key comes round
    // again, so every iteration is a full new request on a bounded map.
    let new_engine = Engine::new(
        Arc::new(MemoryStore::new()),
        Policy::default().with_ttl(Duration::ZERO),
    );
    let requests: Vec<_> = (0..65_536)
        .map(|i| request(&format!("key-{i:08}")))
        .collect();
    let mut i = 0;
    g.bench_function("memory/new_request", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            let Begin::Execute(mut guard) = now(new_engine.begin(&requests[i], BODY)) else {
                panic!("a free key executes");
            };
            guard.mark_started();
            now(guard.complete(&response())).expect("stored");
        })
    });

    let replay_engine = Engine::new(Arc::new(MemoryStore::new()), Policy::default());
    let replayed = request("replayed-key");
    let Begin::Execute(guard) = now(replay_engine.begin(&replayed, BODY)) else {
        panic!("a free key executes");
    };
    now(guard.complete(&response())).expect("stored");
    g.bench_function("memory/replay", |b| {
        b.iter(|| {
            let Begin::Replay(r) = now(replay_engine.begin(&replayed, BODY)) else {
                panic!("replay");
            };
            r
        })
    });

    // One call through the tower layer, answered from the store.
    let handler = tower::service_fn(|_req: http::Request<_>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
            Bytes::from_static(b"created"),
        )))
    });
    let mut layered = tower::Layer::layer(
        &keel_idempotency::IdempotencyLayer::new(Engine::new(
            Arc::new(MemoryStore::new()),
            Policy::default(),
        )),
        handler,
    );
    let layer_request = || {
        let (parts, ()) = request("layer-key").into_parts();
        http::Request::from_parts(parts, http_body_util::Full::new(Bytes::from_static(BODY)))
    };
    let first = now(tower::Service::call(&mut layered, layer_request())).expect("infallible");
    assert!(!first.headers().contains_key("idempotent-replayed"));
    g.bench_function("layer/replay", |b| {
        b.iter(|| {
            let r = now(tower::Service::call(&mut layered, layer_request())).expect("infallible");
            assert!(r.headers().contains_key("idempotent-replayed"));
            r
        })
    });

    let store = MemoryStore::new();
    let keys: Vec<_> = (0..65_536)
        .map(|i| StoreKey::new(format!("idem:{i:064x}")).expect("valid"))
        .collect();
    let mut j = 0;
    g.bench_function("memory/store_pair_only", |b| {
        b.iter(|| {
            j = (j + 1) % keys.len();
            let Ok(Claim::Acquired { token }) = now(store.claim(
                &keys[j],
                Fingerprint::from_bytes([1; 32]),
                Lease::freeing(Duration::from_secs(30)),
            )) else {
                panic!("free");
            };
            now(store.complete(&keys[j], token, b"x", Duration::ZERO)).expect("stored");
        })
    });
    g.finish();

    let dir = tempfile::tempdir().expect("tempdir");
    let embedded = Engine::new(
        Arc::new(keel_idempotency::embedded::EmbeddedStore::open_dir(dir.path()).expect("open")),
        Policy::default().with_ttl(Duration::ZERO),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    let mut k = 0;
    g.bench_function("embedded/new_request", |b| {
        b.iter(|| {
            rt.block_on(async {
                k = (k + 1) % requests.len();
                let Begin::Execute(mut guard) = embedded.begin(&requests[k], BODY).await else {
                    panic!("a free key executes");
                };
                guard.mark_started();
                guard.complete(&response()).await.expect("stored");
            })
        })
    });
    g.finish();
}

criterion_group!(benches, engine_benches);
criterion_main!(benches);
