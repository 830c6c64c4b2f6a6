//! Exactly-once `Idempotency-Key` handling.
//!
//! A client that does not know whether its POST went through retries it with
//! the same `Idempotency-Key`. This crate makes sure the operation runs at
//! most once and every retry gets the first result, across concurrent
//! duplicates, crashed holders and several instances sharing a store.
//!
//! # How it works
//!
//! 1. The [engine](engine::Engine) parses the key (Structured Field string
//!    `"abc"` or bare `abc`), scopes it to the tenant (a digest of the
//!    `Authorization` header by default, or any function of the request
//!    head and extensions: [`Tenant`]), the method and the path, and
//!    hashes all that into a [`store::StoreKey`]. A keyed request without a
//!    tenant is refused (400) unless the route admits anonymous callers
//!    ([`MissingTenant`]): two callers never share a key by accident. It
//!    fingerprints the request
//!    (XXH3-128 of method, path, query, body, chosen headers; optionally
//!    canonical JSON; see [`fingerprint`] for why that is enough, and how
//!    the BLAKE3 fingerprints of records written before still compare).
//! 2. It **claims** the key in one atomic store operation, with a lease and
//!    a [fencing token](store::FencingToken). The first request wins and
//!    executes; a duplicate gets 409 with `Retry-After` (or waits and gets
//!    the replay); a key reused for a different request gets 422.
//! 3. When the operation finishes, the [`engine::Guard`] records the
//!    response (status, allow-listed headers, body, original request id)
//!    for the TTL, or releases the claim for "not processed" answers (408,
//!    409, 425, 429, the route's own list, or a response carrying
//!    [`NotExecuted`]: a released key only ever means the work did not
//!    run), or locks the key as "outcome unknown" when the result
//!    was lost. A holder whose lease expired is fenced off: its late
//!    completion cannot overwrite the newer claim's record.
//! 4. Retries get the stored response with `Idempotent-Replayed: true` and
//!    `Original-Request-Id`. `Set-Cookie` is never replayed unless allowed.
//!
//! Refusals are `application/problem+json` ([`problem`]) with a stable
//! `type` per kind. If the store is down the engine fails closed (503 with
//! `Retry-After`) or open, per route, behind a [gate](gate::StoreGate) that
//! stops calling a dead store.
//!
//! # Pieces
//!
//! - [`engine`]: the per-request decision ([`engine::Engine::begin`]) and
//!   its [`engine::Policy`];
//! - [`layer`]: a tower [`Layer`](layer::IdempotencyLayer) for axum/hyper
//!   services, a thin adapter over the engine;
//! - [`consumer`]: [`consumer::process_once`] for message consumers, on the
//!   same stores;
//! - stores behind one trait ([`store::Store`]), all passing
//!   `conformance` (the suite every store must pass, for implementers'
//!   tests; cargo feature `conformance`): [`memory`] (sharded, bounded),
//!   `embedded` (durable on local disk, an append-only log), `redis` and `postgres`.
//!
//! The main types are re-exported at the crate root
//! (`keel_idempotency::{Engine, Policy, IdempotencyLayer, MemoryStore, ...}`);
//! the modules hold the rest and the details.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use keel_idempotency::{Begin, Engine, MemoryStore, Policy};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let engine = Engine::new(Arc::new(MemoryStore::new()), Policy::default());
//! let req = http::Request::post("/charges")
//!     .header("authorization", "Bearer alice")
//!     .header("idempotency-key", "\"5f1c\"")
//!     .body(())
//!     .unwrap();
//! match engine.begin(&req, b"amount=100").await {
//!     Begin::Execute(mut guard) => {
//!         guard.mark_started();
//!         let response = http::Response::new("charged");
//!         guard.complete(&response).await.unwrap();
//!     }
//!     Begin::Replay(response) | Begin::Reject(response) => { let _ = response; }
//!     Begin::PassThrough(_) => {}
//! }
//! let Begin::Replay(again) = engine.begin(&req, b"amount=100").await else { panic!() };
//! assert_eq!(again.body(), "charged");
//! # });
//! ```

pub mod codec;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod consumer;
pub mod engine;
pub mod fingerprint;
pub mod gate;
pub mod key;
pub mod layer;
pub mod problem;
pub mod store;

pub mod memory;

#[cfg(feature = "embedded")]
pub mod embedded;

#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "postgres")]
pub mod postgres;

pub use consumer::{Consumer, ProcessError, Processed, process_once};
pub use engine::{
    Begin, Completion, Engine, Guard, InFlight, KeyLookup, KeyStatus, LapsedLease, MissingTenant,
    NotExecuted, PassReason, Policy, RequestHead, ServerErrors, StoreDown, Tenant, TenantFn,
};
pub use fingerprint::FingerprintConfig;
pub use gate::{AlwaysAllow, ConsecutiveFailures, StoreGate};
pub use key::KeyError;
pub use layer::{Idempotency, IdempotencyLayer};
pub use memory::{MemoryConfig, MemoryStore};
pub use problem::{Problem, ProblemKind};
pub use store::{
    Claim, FencingToken, Fingerprint, FingerprintKind, KeyState, Lapse, Lease, Store, StoreError,
    StoreKey,
};

#[cfg(feature = "breaker")]
pub use gate::BreakerGate;

#[cfg(feature = "embedded")]
pub use embedded::{EmbeddedConfig, EmbeddedStore};

#[cfg(feature = "redis")]
pub use redis::{RedisOptions, RedisStore};

#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};
