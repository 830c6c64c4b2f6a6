//! The engine: decides, per request, whether to execute, replay or refuse.
//!
//! It knows the `http` crate's types but nothing of hyper or of any server,
//! so the gateway and the [tower layer](crate::layer) drive it the same way:
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use keel_idempotency::engine::{Begin, Engine, Policy};
//! use keel_idempotency::memory::MemoryStore;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let engine = Engine::new(Arc::new(MemoryStore::new()), Policy::default());
//! let request = Request::post("/orders")
//!     .header("authorization", "Bearer alice")
//!     .header("idempotency-key", "order-1")
//!     .header("x-request-id", "req-1")
//!     .body(())
//!     .unwrap();
//! let body = br#"{"sku":"A1"}"#;
//!
//! // First request: execute, then record the response.
//! let Begin::Execute(mut guard) = engine.begin(&request, body).await else { panic!() };
//! guard.mark_started(); // the request is about to leave for the upstream
//! let response = Response::builder().status(201).body(Bytes::from("created")).unwrap();
//! guard.complete(&response).await.unwrap();
//!
//! // A retry with the same key and body gets the first response back.
//! let Begin::Replay(replay) = engine.begin(&request, body).await else { panic!() };
//! assert_eq!(replay.status(), StatusCode::CREATED);
//! assert_eq!(replay.headers()["idempotent-replayed"], "true");
//! assert_eq!(replay.headers()["original-request-id"], "req-1");
//! assert_eq!(replay.body(), "created");
//! # });
//! ```
//!
//! # Finishing a claim
//!
//! [`Begin::Execute`] hands over a [`Guard`] that holds the claim. Finish it
//! with exactly one of:
//!
//! - [`Guard::complete`] with the response (the outcome policy decides
//!   whether it is stored or released);
//! - [`Guard::release`] when the operation certainly did not run (the
//!   upstream refused the connection, the request never left);
//! - [`Guard::outcome_unknown`] when it may have run but the result is lost
//!   (connection dropped after sending, timeout): the key is then locked
//!   with a record that answers retries with a clear 409 problem instead of
//!   running the operation again.
//!
//! A guard dropped unfinished (a panic, a cancelled future) finishes itself
//! on a spawned task: it releases the claim if [`Guard::mark_started`] was
//! never called, and records "outcome unknown" if it was. Without a tokio
//! runtime at drop time the claim lapses at the end of its lease.
//!
//! # Leases
//!
//! Run the work under [`Guard::hold`]: it renews the lease every third of
//! it, so a slow but live request keeps its key. A lease that lapses (the
//! process died, or lost the store for two thirds of the lease) locks the
//! key as "outcome unknown" for the TTL ([`LapsedLease::Lock`], the
//! default): the request may have run, so it never runs twice. Routes whose
//! operations are safe to repeat may choose [`LapsedLease::Rerun`]. An
//! operator frees a locked key with [`Engine::remove_key`] once they know
//! what became of it.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use keel_retry::{Backoff, Jitter};

use crate::codec::{self, Record};
use crate::fingerprint::FingerprintConfig;
use crate::gate::{ConsecutiveFailures, StoreGate};
use crate::key::parse_key_cow;
use crate::problem::{Problem, ProblemKind};
use crate::store::{
    Claim, FencingToken, Fingerprint, KeyState, Lease, Store, StoreError, StoreKey,
};

/// The default key header, `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set to `true` on every replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The `x-request-id` of the request that executed, on replays.
pub const ORIGINAL_REQUEST_ID: HeaderName = HeaderName::from_static("original-request-id");
/// The request id header the engine records by default.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A caller-supplied tenant extractor; see [`Tenant::Function`].
pub type TenantFn = Arc<dyn Fn(&RequestHead<'_>) -> Option<String> + Send + Sync>;

/// How the tenant part of the lookup key is found. Two requests share a
/// key only if their tenants are equal, so the tenant must identify the
/// caller: a missing tenant is refused by default ([`MissingTenant`]).
#[derive(Clone)]
pub enum Tenant {
    /// A digest of this header's value (default: `Authorization`). A
    /// request without it, or with an empty value, has no tenant.
    Header(HeaderName),
    /// A caller-supplied function of the request head, extensions
    /// included: an account id an authentication middleware put in the
    /// request's extensions, or one read from a verified token. `None`
    /// means the request has no tenant. Build it with [`Tenant::function`].
    Function(TenantFn),
    /// No tenant: for services where every client is the same principal.
    Single,
}

impl Tenant {
    /// A [`Tenant::Function`] from a closure.
    ///
    /// The usual axum pattern: an authentication middleware puts the
    /// current user into the request's extensions, and the tenant is read
    /// from there (the idempotency layer must then sit inside, that is
    /// after, the authentication layer):
    ///
    /// ```
    /// use keel_idempotency::engine::{Policy, RequestHead, Tenant};
    ///
    /// /// What the authentication middleware inserts.
    /// #[derive(Clone)]
    /// struct CurrentUser(String);
    ///
    /// async fn authenticate(
    ///     mut request: axum::extract::Request,
    ///     next: axum::middleware::Next,
    /// ) -> axum::response::Response {
    ///     // Verify the session cookie here; this sketch trusts its value.
    ///     let user = request
    ///         .headers()
    ///         .get("cookie")
    ///         .and_then(|c| c.to_str().ok())
    ///         .and_then(|c| c.strip_prefix("session="))
    ///         .map(|s| CurrentUser(s.to_owned()));
    ///     if let Some(user) = user {
    ///         request.extensions_mut().insert(user);
    ///     }
    ///     next.run(request).await
    /// }
    ///
    /// let by_user = Tenant::function(|head: &RequestHead<'_>| {
    ///     head.extensions.get::<CurrentUser>().map(|user| user.0.clone())
    /// });
    /// let Tenant::Function(read) = &by_user else { unreachable!() };
    /// let alice = http::Request::post("/orders")
    ///     .extension(CurrentUser("alice".into()))
    ///     .body(())
    ///     .unwrap();
    /// assert_eq!(read(&RequestHead::from(&alice)).as_deref(), Some("alice"));
    ///
    /// // The idempotency layer sits inside the authentication layer, so
    /// // it sees the user (the layer added last runs first).
    /// let engine = keel_idempotency::engine::Engine::new(
    ///     std::sync::Arc::new(keel_idempotency::memory::MemoryStore::new()),
    ///     Policy::default().with_tenant(by_user),
    /// );
    /// let app: axum::Router = axum::Router::new()
    ///     .route("/orders", axum::routing::post(|| async { "created" }))
    ///     .layer(keel_idempotency::layer::IdempotencyLayer::new(engine))
    ///     .layer(axum::middleware::from_fn(authenticate));
    /// ```
    pub fn function<F>(f: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<String> + Send + Sync + 'static,
    {
        Self::Function(Arc::new(f))
    }
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(h) => f.debug_tuple("Header").field(h).finish(),
            Self::Function(_) => f.write_str("Function(..)"),
            Self::Single => f.write_str("Single"),
        }
    }
}

/// What a keyed request without a tenant (its [`Tenant`] source is absent:
/// no `Authorization` header, no user in the extensions) gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingTenant {
    /// Refuse it with a 400 problem, `urn:keel:problem:idempotency-tenant-missing`
    /// (default). Without a tenant the engine cannot tell two callers
    /// apart, and one caller could be handed another's stored response.
    #[default]
    Reject,
    /// Admit it under one shared anonymous tenant: every request without a
    /// tenant shares one key space, so two callers sending the same key
    /// and body get one execution and the second receives the first's
    /// response. Only for routes where that is harmless (the callers are
    /// the same principal, or the responses carry nothing private).
    Anonymous,
}

/// What to do with a duplicate that arrives while the first is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InFlight {
    /// Answer 409 with `Retry-After` at once (default).
    Reject,
    /// Wait up to this long for the first to finish, then replay its
    /// response (or 409 if it is still running).
    Wait(Duration),
}

/// A response extension by which the operation says "I did not run":
/// the layer (and [`Guard::complete`]) then releases the claim instead of
/// storing the response, and the client's retry with the same key runs.
///
/// Exactly once holds only if a released key means the work did not run.
/// Attach it only when nothing happened: the handler's circuit breaker
/// refused the outbound call, a validation failed before any write, the
/// request never left. Never attach it after a call that may have reached
/// the other side (a timeout, a dropped connection): that is "outcome
/// unknown", and a retry would run the operation twice.
///
/// ```
/// use http::StatusCode;
/// use keel_idempotency::engine::NotExecuted;
///
/// // In a handler whose outbound call was refused before it was sent:
/// let mut response = http::Response::new("payment provider unavailable; retry later");
/// *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
/// response.extensions_mut().insert(NotExecuted);
/// ```
///
/// With axum, return it beside the response: `(StatusCode::BAD_GATEWAY,
/// axum::Extension(NotExecuted), "...")`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NotExecuted;

/// What a 5xx response means for the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerErrors {
    /// Store it and replay it: the operation may have happened (default,
    /// Stripe's rule).
    Store,
    /// Release the claim so a retry runs again: only for operations their
    /// owner knows are safe to re-run.
    Release,
}

/// What a claim whose lease lapsed (its holder crashed or lost the store
/// before recording an outcome) makes of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LapsedLease {
    /// Lock the key as "outcome unknown" for the TTL (default): the holder
    /// may have sent the request, so it is never run a second time. An
    /// operator who has reconciled releases it ([`Engine::remove_key`]).
    Lock,
    /// Free the key: the next retry runs the operation again. At-least-once
    /// after a crash, for operations that are safe to repeat.
    Rerun,
}

/// What to do when the store cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDown {
    /// 503 problem with `Retry-After` (default).
    FailClosed,
    /// Pass the request through without idempotency.
    FailOpen,
}

/// One route's idempotency settings. Cheap to clone; build with the
/// chained setters.
///
/// ```
/// use keel_idempotency::engine::{InFlight, Policy};
/// use std::time::Duration;
///
/// let policy = Policy::default()
///     .with_required(true)
///     .with_lease_for_timeout(Duration::from_secs(10))
///     .with_in_flight(InFlight::Wait(Duration::from_secs(5)));
/// assert_eq!(policy.lease(), Duration::from_secs(11)); // timeout + 10 %, at least 1 s
/// ```
#[derive(Clone, Debug)]
pub struct Policy {
    header: HeaderName,
    methods: Vec<Method>,
    required: bool,
    max_key_len: usize,
    ttl: Duration,
    lease: Duration,
    tenant: Tenant,
    missing_tenant: MissingTenant,
    fingerprint: FingerprintConfig,
    in_flight: InFlight,
    server_errors: ServerErrors,
    release_statuses: Vec<StatusCode>,
    store_down: StoreDown,
    store_retry_after: Duration,
    lapsed_lease: LapsedLease,
    record_retry: Duration,
    max_body: usize,
    max_response: usize,
    replay_headers: Vec<HeaderName>,
    request_id_header: HeaderName,
    namespace: String,
}

impl Default for Policy {
    /// POST and PATCH, key optional, 255-character keys, 24 h TTL, 35 s
    /// lease (a 30 s timeout plus margin) that locks the key when it lapses,
    /// outcome writes retried for up to 10 s, tenant from `Authorization`
    /// (keyed requests without it refused),
    /// 409 on in-flight duplicates, 5xx stored, fail-closed, 1 MiB request
    /// and response limits.
    fn default() -> Self {
        Self {
            header: IDEMPOTENCY_KEY,
            methods: vec![Method::POST, Method::PATCH],
            required: false,
            max_key_len: 255,
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(35),
            tenant: Tenant::Header(http::header::AUTHORIZATION),
            missing_tenant: MissingTenant::Reject,
            fingerprint: FingerprintConfig::default(),
            in_flight: InFlight::Reject,
            server_errors: ServerErrors::Store,
            release_statuses: Vec::new(),
            store_down: StoreDown::FailClosed,
            store_retry_after: Duration::from_secs(2),
            lapsed_lease: LapsedLease::Lock,
            record_retry: Duration::from_secs(10),
            max_body: 1 << 20,
            max_response: 1 << 20,
            replay_headers: [
                "content-type",
                "content-encoding",
                "content-language",
                "location",
                "etag",
                "last-modified",
                "cache-control",
            ]
            .into_iter()
            .map(HeaderName::from_static)
            .collect(),
            request_id_header: X_REQUEST_ID,
            namespace: "idem".into(),
        }
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $setter:ident => $name:ident: $ty:ty, $example:literal) => {
        $(#[$doc])*
        ///
        /// ```
        /// # use keel_idempotency::engine::*;
        /// # use std::time::Duration;
        #[doc = $example]
        /// ```
        pub fn $setter(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl Policy {
    setter!(
        /// The key header's name (default `Idempotency-Key`).
        with_header => header: HeaderName,
        "let p = Policy::default().with_header(http::HeaderName::from_static(\"x-idempotency-key\"));"
    );
    setter!(
        /// Whether a covered request without a key is refused with 400
        /// (`true`) or passed through untouched (`false`, default).
        with_required => required: bool,
        "let p = Policy::default().with_required(true);"
    );
    setter!(
        /// The longest key accepted (default 255 characters).
        with_max_key_len => max_key_len: usize,
        "let p = Policy::default().with_max_key_len(64);"
    );
    setter!(
        /// How long a completed result is kept and replayed (default 24 h).
        with_ttl => ttl: Duration,
        "let p = Policy::default().with_ttl(Duration::from_secs(3600));"
    );
    setter!(
        /// How long a claim holds before another request may take the key
        /// over (default 35 s). Prefer [`Policy::with_lease_for_timeout`].
        with_lease => lease: Duration,
        "let p = Policy::default().with_lease(Duration::from_secs(5));"
    );
    setter!(
        /// Where the tenant comes from (default: a digest of
        /// `Authorization`).
        with_tenant => tenant: Tenant,
        "let p = Policy::default().with_tenant(Tenant::Header(http::HeaderName::from_static(\"x-api-key\")));"
    );
    setter!(
        /// What a keyed request without a tenant gets (default: 400,
        /// [`MissingTenant::Reject`]).
        with_missing_tenant => missing_tenant: MissingTenant,
        "let p = Policy::default().with_missing_tenant(MissingTenant::Anonymous);"
    );
    setter!(
        /// What goes into the fingerprint.
        with_fingerprint => fingerprint: FingerprintConfig,
        "let p = Policy::default().with_fingerprint(keel_idempotency::fingerprint::FingerprintConfig::default().canonical_json(true));"
    );
    setter!(
        /// What an in-flight duplicate gets (default: 409).
        with_in_flight => in_flight: InFlight,
        "let p = Policy::default().with_in_flight(InFlight::Wait(Duration::from_secs(2)));"
    );
    setter!(
        /// What a 5xx response does to the key (default: stored).
        with_server_errors => server_errors: ServerErrors,
        "let p = Policy::default().with_server_errors(ServerErrors::Release);"
    );
    setter!(
        /// What happens when the store is unreachable (default: 503).
        with_store_down => store_down: StoreDown,
        "let p = Policy::default().with_store_down(StoreDown::FailOpen);"
    );
    setter!(
        /// The `Retry-After` of the 503 sent when the store is down
        /// (default 2 s).
        with_store_retry_after => store_retry_after: Duration,
        "let p = Policy::default().with_store_retry_after(Duration::from_secs(5));"
    );
    setter!(
        /// What a lapsed lease makes of its key (default: locked as
        /// "outcome unknown").
        with_lapsed_lease => lapsed_lease: LapsedLease,
        "let p = Policy::default().with_lapsed_lease(LapsedLease::Rerun);"
    );
    setter!(
        /// How long a failed write of an outcome (a stored response, an
        /// "outcome unknown" lock, a release) is retried, with capped and
        /// jittered backoff, while the store is unreachable (default 10 s).
        /// The claim is renewed meanwhile; if the write still fails, the
        /// claim lapses and, with [`LapsedLease::Lock`], locks the key.
        with_record_retry => record_retry: Duration,
        "let p = Policy::default().with_record_retry(Duration::from_secs(3));"
    );
    setter!(
        /// The largest request body on a covered request (default 1 MiB);
        /// larger ones get 413.
        with_max_body => max_body: usize,
        "let p = Policy::default().with_max_body(64 << 10);"
    );
    setter!(
        /// The largest response body kept for replay (default 1 MiB). A
        /// larger response is still delivered; the key keeps a record that
        /// says so and retries get a 409 problem.
        with_max_response => max_response: usize,
        "let p = Policy::default().with_max_response(256 << 10);"
    );
    setter!(
        /// The request id header recorded and echoed as
        /// `Original-Request-Id` (default `x-request-id`).
        with_request_id_header => request_id_header: HeaderName,
        "let p = Policy::default().with_request_id_header(http::HeaderName::from_static(\"x-correlation-id\"));"
    );
    setter!(
        /// A prefix for store keys, so that several engines (or test runs)
        /// can share one store without meeting (default `idem`). Printable
        /// ASCII, at most 64 characters; anything else is replaced.
        with_namespace => namespace: String,
        "let p = Policy::default().with_namespace(\"orders-api\".to_string());"
    );

    /// The methods covered (default POST and PATCH); others pass through.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// let p = Policy::default().with_methods([http::Method::POST, http::Method::PUT]);
    /// ```
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Statuses that, on this route, mean "not executed": a response with
    /// one releases the claim (like 408, 409, 425 and 429 always do)
    /// instead of being stored, so a retry runs. Name a status here only
    /// if every response with it on this route is sent before the
    /// operation had any effect (a released key must only ever mean the
    /// work did not run); otherwise attach [`NotExecuted`] to the
    /// responses that qualify. A policy is per route: give each route its
    /// own engine (axum's `route_layer`) for different lists.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// use http::StatusCode;
    /// // This route answers 503 only when its breaker refused the call.
    /// let p = Policy::default().with_release_statuses([StatusCode::SERVICE_UNAVAILABLE]);
    /// assert!(p.releases(StatusCode::SERVICE_UNAVAILABLE));
    /// assert!(p.releases(StatusCode::TOO_MANY_REQUESTS));
    /// assert!(!p.releases(StatusCode::BAD_GATEWAY));
    /// ```
    pub fn with_release_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.release_statuses = statuses.into_iter().collect();
        self
    }

    /// Whether a response with `status` releases the claim on this route:
    /// 408, 409, 425 and 429 always, 5xx where [`ServerErrors::Release`],
    /// and the [`release_statuses`](Self::with_release_statuses).
    ///
    /// ```
    /// # use keel_idempotency::engine::{Policy, ServerErrors};
    /// use http::StatusCode;
    /// assert!(!Policy::default().releases(StatusCode::BAD_GATEWAY));
    /// assert!(Policy::default().with_server_errors(ServerErrors::Release).releases(StatusCode::BAD_GATEWAY));
    /// ```
    pub fn releases(&self, status: StatusCode) -> bool {
        matches!(status.as_u16(), 408 | 409 | 425 | 429)
            || (status.is_server_error() && self.server_errors == ServerErrors::Release)
            || self.release_statuses.contains(&status)
    }

    /// Sets the lease to the route's timeout plus a margin (a tenth of the
    /// timeout, at least 1 s and at most 30 s), so a claim outlives a slow
    /// but healthy request and lapses soon after a crashed one.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// # use std::time::Duration;
    /// assert_eq!(Policy::default().with_lease_for_timeout(Duration::from_secs(2)).lease(), Duration::from_secs(3));
    /// ```
    pub fn with_lease_for_timeout(mut self, timeout: Duration) -> Self {
        let margin = (timeout / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.lease = timeout + margin;
        self
    }

    /// Replays header `name` too. `Set-Cookie` is replayed only if named
    /// here.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// let p = Policy::default().with_replay_header(http::HeaderName::from_static("x-order-id"));
    /// assert!(p.replay_headers().iter().any(|h| h == "x-order-id"));
    /// ```
    pub fn with_replay_header(mut self, name: HeaderName) -> Self {
        if !self.replay_headers.contains(&name) {
            self.replay_headers.push(name);
        }
        self
    }

    /// Replaces the whole replay allow-list.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// let p = Policy::default().with_replay_headers_only([http::header::CONTENT_TYPE]);
    /// assert_eq!(p.replay_headers().len(), 1);
    /// ```
    pub fn with_replay_headers_only(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.replay_headers = names.into_iter().collect();
        self
    }

    /// The replay allow-list.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// assert!(!Policy::default().replay_headers().iter().any(|h| h == "set-cookie"));
    /// ```
    pub fn replay_headers(&self) -> &[HeaderName] {
        &self.replay_headers
    }

    /// The lease.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// assert_eq!(Policy::default().lease().as_secs(), 35);
    /// ```
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The terms every claim of this policy is made on: the lease, and
    /// what its lapse makes of the key (locked for the TTL, or free).
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// use keel_idempotency::store::Lapse;
    /// let lease = Policy::default().store_lease();
    /// assert_eq!(lease.lapse, Lapse::Lock(Policy::default().ttl()));
    /// ```
    pub fn store_lease(&self) -> Lease {
        match self.lapsed_lease {
            LapsedLease::Lock => Lease::locking(self.lease, self.ttl),
            LapsedLease::Rerun => Lease::freeing(self.lease),
        }
    }

    /// The TTL of results.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// assert_eq!(Policy::default().ttl().as_secs(), 86_400);
    /// ```
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The request body limit.
    ///
    /// ```
    /// # use keel_idempotency::engine::Policy;
    /// assert_eq!(Policy::default().max_body(), 1 << 20);
    /// ```
    pub fn max_body(&self) -> usize {
        self.max_body
    }
}

/// The parts of a request the engine (and a [`Tenant::Function`]) reads:
/// the whole head, extensions included. Built from an [`http::Request`]
/// or [`http::request::Parts`] (by reference) with `into()`.
///
/// ```
/// use keel_idempotency::engine::RequestHead;
/// let req = http::Request::post("/a?b=1").extension(7u32).body(()).unwrap();
/// let head = RequestHead::from(&req);
/// assert_eq!(head.uri.path(), "/a");
/// assert_eq!(head.extensions.get::<u32>(), Some(&7));
/// ```
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The target.
    pub uri: &'a Uri,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The extensions (what middleware inserted: the authenticated user).
    pub extensions: &'a http::Extensions,
}

impl<'a, B> From<&'a Request<B>> for RequestHead<'a> {
    fn from(r: &'a Request<B>) -> Self {
        Self {
            method: r.method(),
            uri: r.uri(),
            headers: r.headers(),
            extensions: r.extensions(),
        }
    }
}

impl<'a> From<&'a http::request::Parts> for RequestHead<'a> {
    fn from(p: &'a http::request::Parts) -> Self {
        Self {
            method: &p.method,
            uri: &p.uri,
            headers: &p.headers,
            extensions: &p.extensions,
        }
    }
}

/// Why a request was passed through without idempotency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassReason {
    /// Its method is not covered by the route.
    MethodNotCovered,
    /// It carries no key and the route does not require one.
    NoKey,
    /// The store is unreachable and the route fails open.
    StoreUnavailable,
}

/// The engine's decision for one request.
#[derive(Debug)]
#[must_use = "the decision says whether to run the request"]
pub enum Begin {
    /// Run the operation, then finish the [`Guard`].
    Execute(Guard),
    /// Send this stored response; do not run the operation.
    Replay(Response<Bytes>),
    /// Send this problem response; do not run the operation.
    Reject(Response<Bytes>),
    /// Run the operation without idempotency.
    PassThrough(PassReason),
}

/// What [`Guard::complete`] did with the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Stored for replay.
    Stored,
    /// The response said the operation did not run ([`NotExecuted`], or a
    /// status the policy [releases](Policy::releases)): the claim was
    /// released and a retry will run again.
    Released,
    /// The body was over the limit: a record saying so was stored.
    TooLarge,
}

/// Names one client key for an operator: the parts the engine builds the
/// store key from. See [`Engine::key_status`].
#[derive(Clone, Copy, Debug)]
pub struct KeyLookup<'a> {
    /// The raw tenant value (what [`Tenant`] reads), `None` for anonymous.
    pub tenant: Option<&'a [u8]>,
    /// The request's method.
    pub method: &'a Method,
    /// The request's path.
    pub path: &'a str,
    /// The client's `Idempotency-Key` value (without quotes).
    pub key: &'a str,
}

/// A key's state, described for an operator (the admin API serialises it).
///
/// ```
/// use keel_idempotency::engine::KeyStatus;
/// let free = KeyStatus::describe(None);
/// assert_eq!((free.state, free.status), ("free", None));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStatus {
    /// `free`, `in_flight`, `abandoned` (a lapsed lease: outcome unknown),
    /// `completed`, `outcome_unknown` (recorded as lost) or `not_stored`
    /// (ran; the response was too large to keep).
    pub state: &'static str,
    /// The recorded status code, for `completed` and `not_stored`.
    pub status: Option<u16>,
    /// The `x-request-id` of the request that ran, where recorded.
    pub request_id: Option<String>,
    /// Seconds until the lease lapses (`in_flight`) or the record or lock
    /// expires by itself.
    pub expires_in: Option<Duration>,
    /// The fencing token of the claim, for `in_flight` and `abandoned`.
    pub token: Option<u64>,
}

impl KeyStatus {
    /// Describes what [`Store::inspect`] returned.
    pub fn describe(state: Option<KeyState>) -> Self {
        let mut out = Self {
            state: "free",
            status: None,
            request_id: None,
            expires_in: None,
            token: None,
        };
        match state {
            None => {}
            Some(KeyState::Held {
                token, lease_left, ..
            }) => {
                out.state = "in_flight";
                out.token = Some(token.get());
                out.expires_in = Some(lease_left);
            }
            Some(KeyState::Abandoned {
                token, expires_in, ..
            }) => {
                out.state = "abandoned";
                out.token = Some(token.get());
                out.expires_in = Some(expires_in);
            }
            Some(KeyState::Completed {
                payload,
                expires_in,
                ..
            }) => {
                out.expires_in = Some(expires_in);
                match Record::decode(&payload) {
                    Ok(Record::Response(r)) => {
                        out.state = "completed";
                        out.status = Some(r.status);
                        out.request_id = r.request_id;
                    }
                    Ok(Record::OutcomeUnknown { request_id }) => {
                        out.state = "outcome_unknown";
                        out.request_id = request_id;
                    }
                    Ok(Record::TooLarge {
                        status, request_id, ..
                    }) => {
                        out.state = "not_stored";
                        out.status = Some(status);
                        out.request_id = request_id;
                    }
                    Err(_) => out.state = "corrupt",
                }
            }
        }
        out
    }
}

struct Inner {
    store: Arc<dyn Store>,
    gate: Arc<dyn StoreGate>,
    policy: Policy,
    namespace: String,
}

/// The idempotency engine for one route (or several sharing a policy).
/// Cheap to clone; share the store and the gate between routes.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.inner.store.name())
            .field("policy", &self.inner.policy)
            .finish()
    }
}

impl Engine {
    /// An engine over `store` with `policy` and a default
    /// [`ConsecutiveFailures`] gate of its own.
    ///
    /// ```
    /// use keel_idempotency::{engine::{Engine, Policy}, memory::MemoryStore};
    /// let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// ```
    pub fn new(store: Arc<dyn Store>, policy: Policy) -> Self {
        Self::with_gate(store, Arc::new(ConsecutiveFailures::default()), policy)
    }

    /// An engine whose store calls go through `gate` (share one gate per
    /// store between the routes that use it).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keel_idempotency::{engine::{Engine, Policy}, gate::AlwaysAllow, memory::MemoryStore};
    /// let engine = Engine::with_gate(Arc::new(MemoryStore::new()), Arc::new(AlwaysAllow), Policy::default());
    /// ```
    pub fn with_gate(store: Arc<dyn Store>, gate: Arc<dyn StoreGate>, policy: Policy) -> Self {
        let mut namespace: String = policy
            .namespace
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .take(64)
            .collect();
        if namespace.is_empty() {
            namespace.push_str("idem");
        }
        Self {
            inner: Arc::new(Inner {
                store,
                gate,
                policy,
                namespace,
            }),
        }
    }

    /// The route's policy.
    ///
    /// ```
    /// use keel_idempotency::{engine::{Engine, Policy}, memory::MemoryStore};
    /// let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// assert_eq!(engine.policy().max_body(), 1 << 20);
    /// ```
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// True if the engine may act on this request (its method is covered),
    /// so the caller must buffer the body (up to
    /// [`Policy::max_body`] + 1 bytes) before [`Engine::begin`].
    ///
    /// ```
    /// use keel_idempotency::{engine::{Engine, Policy}, memory::MemoryStore};
    /// let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// assert!(engine.covers(&http::Method::POST));
    /// assert!(!engine.covers(&http::Method::GET));
    /// ```
    pub fn covers(&self, method: &Method) -> bool {
        self.inner.policy.methods.contains(method)
    }

    /// True if [`Engine::begin`] needs this request's body: its method is
    /// covered and it carries a key (or the route requires one). Otherwise
    /// the caller may stream the body straight through; `begin` would pass
    /// the request through anyway.
    ///
    /// ```
    /// use keel_idempotency::{engine::{Engine, Policy, RequestHead}, memory::MemoryStore};
    /// let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// let keyed = http::Request::post("/a").header("idempotency-key", "k").body(()).unwrap();
    /// let plain = http::Request::post("/a").body(()).unwrap();
    /// assert!(engine.needs_body(RequestHead::from(&keyed)));
    /// assert!(!engine.needs_body(RequestHead::from(&plain)));
    /// ```
    pub fn needs_body(&self, head: RequestHead<'_>) -> bool {
        let policy = &self.inner.policy;
        self.covers(head.method) && (policy.required || head.headers.contains_key(&policy.header))
    }

    /// Decides what to do with one request whose full body is `body`. See
    /// the [module docs](self).
    ///
    /// ```
    /// use keel_idempotency::{engine::{Begin, Engine, Policy}, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default().with_required(true));
    /// let req = http::Request::post("/pay").body(()).unwrap();
    /// let Begin::Reject(problem) = engine.begin(&req, b"").await else { panic!() };
    /// assert_eq!(problem.status(), 400);
    /// # });
    /// ```
    pub async fn begin<'a>(&self, head: impl Into<RequestHead<'a>>, body: &[u8]) -> Begin {
        let head = head.into();
        let policy = &self.inner.policy;
        if !self.covers(head.method) {
            return Begin::PassThrough(PassReason::MethodNotCovered);
        }
        let mut values = head.headers.get_all(&policy.header).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            if head.headers.contains_key(&policy.header) {
                return reject(Problem::new(
                    ProblemKind::KeyInvalid,
                    format!("send exactly one {} header", policy.header),
                ));
            }
            if policy.required {
                return reject(Problem::new(
                    ProblemKind::KeyMissing,
                    format!(
                        "{} {} requires an {} header; send a unique value (a UUID) and reuse it on retries",
                        head.method,
                        head.uri.path(),
                        policy.header
                    ),
                ));
            }
            return Begin::PassThrough(PassReason::NoKey);
        };
        let client_key = match parse_key_cow(value.as_bytes(), policy.max_key_len) {
            Ok(k) => k,
            Err(e) => return reject(Problem::new(ProblemKind::KeyInvalid, e.to_string())),
        };
        if body.len() > policy.max_body {
            return reject(Problem::new(
                ProblemKind::BodyTooLarge,
                format!(
                    "idempotent requests on this route accept bodies up to {} bytes",
                    policy.max_body
                ),
            ));
        }
        if head.method == Method::CONNECT || head.headers.contains_key(http::header::UPGRADE) {
            // A tunnel is not a result that can be recorded or replayed: a
            // retry could only run the operation again.
            return reject(Problem::new(
                ProblemKind::UpgradeRefused,
                format!(
                    "a request with an {} cannot upgrade the connection; send it without Upgrade, or without the key",
                    policy.header
                ),
            ));
        }
        // Shape errors (key, body, upgrade) come first; then who is asking.
        let tenant: Option<std::borrow::Cow<'_, [u8]>> = match &policy.tenant {
            // An empty value names nobody: callers sending `Authorization: `
            // must not share one key space.
            Tenant::Header(name) => head
                .headers
                .get(name)
                .filter(|v| !v.as_bytes().trim_ascii().is_empty())
                .map(|v| v.as_bytes().into()),
            Tenant::Function(f) => f(&head).map(|t| t.into_bytes().into()),
            Tenant::Single => None,
        };
        if tenant.is_none()
            && !matches!(policy.tenant, Tenant::Single)
            && policy.missing_tenant == MissingTenant::Reject
        {
            let source = match &policy.tenant {
                Tenant::Header(name) => format!("an {name} header"),
                _ => "an authenticated caller".to_owned(),
            };
            return reject(Problem::new(
                ProblemKind::TenantMissing,
                format!(
                    "{} {} with an {} needs {source}: idempotency keys are scoped to the caller, and this request names none",
                    head.method,
                    head.uri.path(),
                    policy.header
                ),
            ));
        }
        let key = self.key_of(tenant.as_deref(), head.method, head.uri.path(), &client_key);
        let print = Print {
            current: policy
                .fingerprint
                .digest(head.method, head.uri, head.headers, body),
            config: &policy.fingerprint,
            head,
            body,
        };
        // Kept as the header value (a shared buffer, no copy); only values
        // that are text, so `RequestId::as_str` never fails.
        let request_id = head
            .headers
            .get(&policy.request_id_header)
            .filter(|v| v.to_str().is_ok())
            .cloned()
            .map(RequestId);
        self.claim_loop(key, &print, request_id).await
    }

    /// The store key of (tenant, method, path, client key): the namespace,
    /// then a digest of the four. Hashing keeps it short and printable
    /// whatever the inputs, and the length prefixes keep `("a:b", "c")`
    /// apart from `("a", "b:c")`. The tenant's own digest rides along so a
    /// bounded store can give each tenant its share.
    fn key_of(
        &self,
        tenant: Option<&[u8]>,
        method: &Method,
        path: &str,
        client_key: &str,
    ) -> StoreKey {
        let digest = scope_digest(
            [
                b"keel-idempotency-key-v1".as_slice(),
                tenant.unwrap_or(b""),
                method.as_str().as_bytes(),
                path.as_bytes(),
                client_key.as_bytes(),
            ],
            u8::from(tenant.is_some()),
        );
        // Namespace is at most 64 printable characters and the digest 64 hex
        // digits, so this is always a valid key. The text stays BLAKE3's:
        // durable stores hold records under it.
        let key = StoreKey::from_digest(&self.inner.namespace, digest.as_bytes());
        // The tenant's digest only picks a memory store's accounting bucket
        // in this process (no store keeps it), so a fast hash will do.
        // 0 means "no tenant"; a tenant whose digest is 0 is charged as 1.
        let tenant_digest = tenant.map_or(0, |t| xxhash_rust::xxh3::xxh3_64(t).max(1));
        key.with_tenant(tenant_digest)
    }

    /// What the store holds for one client key, for an operator
    /// reconciling a key locked as "outcome unknown". `tenant` is the raw
    /// tenant value (the `Authorization` header's, with the default
    /// [`Tenant::Header`]), `None` for the anonymous tenant.
    ///
    /// ```
    /// use keel_idempotency::engine::{Begin, Engine, KeyLookup, KeyStatus, Policy};
    /// use keel_idempotency::memory::MemoryStore;
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// let req = http::Request::post("/pay").header("authorization", "Bearer alice").header("idempotency-key", "k1").body(()).unwrap();
    /// let Begin::Execute(mut guard) = engine.begin(&req, b"{}").await else { panic!() };
    /// guard.mark_started();
    /// guard.outcome_unknown().await.unwrap();
    ///
    /// let lookup = KeyLookup { tenant: Some(b"Bearer alice"), method: &http::Method::POST, path: "/pay", key: "k1" };
    /// assert_eq!(engine.key_status(&lookup).await.unwrap().state, "outcome_unknown");
    /// assert!(engine.remove_key(&lookup).await.unwrap());
    /// assert!(matches!(engine.begin(&req, b"{}").await, Begin::Execute(_)));
    /// # });
    /// ```
    pub async fn key_status(&self, lookup: &KeyLookup<'_>) -> Result<KeyStatus, StoreError> {
        let key = self.lookup_key(lookup);
        let state = self.inner.store.inspect(&key).await?;
        Ok(KeyStatus::describe(state))
    }

    /// Removes whatever the store holds for one client key (see
    /// [`Engine::key_status`]), so the next request with it runs. Returns
    /// whether anything was there. Meant for a key locked as "outcome
    /// unknown" once the operator knows what became of the first attempt.
    ///
    /// ```
    /// use keel_idempotency::engine::{Engine, KeyLookup, Policy};
    /// use keel_idempotency::memory::MemoryStore;
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// let lookup = KeyLookup { tenant: None, method: &http::Method::POST, path: "/pay", key: "never-used" };
    /// assert!(!engine.remove_key(&lookup).await.unwrap());
    /// # });
    /// ```
    pub async fn remove_key(&self, lookup: &KeyLookup<'_>) -> Result<bool, StoreError> {
        let key = self.lookup_key(lookup);
        self.inner.store.remove(&key).await
    }

    fn lookup_key(&self, lookup: &KeyLookup<'_>) -> StoreKey {
        let tenant = match self.inner.policy.tenant {
            Tenant::Single => None,
            _ => lookup.tenant,
        };
        self.key_of(tenant, lookup.method, lookup.path, lookup.key)
    }

    async fn claim_loop(
        &self,
        key: StoreKey,
        print: &Print<'_>,
        request_id: Option<RequestId>,
    ) -> Begin {
        let inner = &self.inner;
        let policy = &inner.policy;
        let deadline = match policy.in_flight {
            InFlight::Wait(max) => Some(tokio::time::Instant::now() + max),
            InFlight::Reject => None,
        };
        let mut backoff = Duration::from_millis(5);
        loop {
            if !inner.gate.allow() {
                return self.store_down("the idempotency store is failing; calls are paused");
            }
            // Before the claim is sent: the store starts the lease later
            // than this, never earlier, so a deadline counted from here is
            // safe (see `Guard::lease_covers`).
            let asked = tokio::time::Instant::now();
            let lease = policy.store_lease();
            let claim = match inner.store.claim_now(&key, print.current, lease) {
                Some(claim) => claim,
                None => inner.store.claim(&key, print.current, lease).await,
            };
            match claim {
                Err(StoreError::Unavailable(why)) => {
                    inner.gate.on_failure();
                    return self.store_down(&why);
                }
                Err(StoreError::Full(why)) => {
                    // A healthy store with no room: this key waits, every
                    // record already held keeps answering.
                    inner.gate.on_success();
                    return reject(
                        Problem::new(
                            ProblemKind::StoreFull,
                            format!("cannot take a new idempotency key right now ({why}); retry later with the same key"),
                        )
                        .retry_after(policy.store_retry_after),
                    );
                }
                Ok(Claim::Abandoned {
                    fingerprint: theirs,
                }) => {
                    inner.gate.on_success();
                    if !print.matches(theirs) {
                        return mismatch();
                    }
                    return reject(Problem::new(
                        ProblemKind::OutcomeUnknown,
                        "an earlier request with this key stopped before its outcome was recorded (the gateway or service handling it failed); it may have been processed and will not be run again. Check the resource's state, then use a new key if needed",
                    ));
                }
                Err(e) => {
                    inner.gate.on_success();
                    return corrupt(&e.to_string());
                }
                Ok(Claim::Acquired { token }) => {
                    inner.gate.on_success();
                    return Begin::Execute(Guard {
                        state: Some(GuardState {
                            inner: inner.clone(),
                            key,
                            token,
                            request_id,
                            started: false,
                            leased_until: asked + policy.lease,
                        }),
                    });
                }
                Ok(Claim::InFlight {
                    fingerprint: theirs,
                    retry_after,
                }) => {
                    inner.gate.on_success();
                    if !print.matches(theirs) {
                        return mismatch();
                    }
                    let now = tokio::time::Instant::now();
                    match deadline {
                        Some(d) if now < d => {
                            // Poll the store again soon: completion is not
                            // pushed to waiters, and a short exponential
                            // backoff keeps both latency and load low.
                            let nap = backoff
                                .min(d - now)
                                .min(retry_after.max(Duration::from_millis(1)));
                            tokio::time::sleep(nap).await;
                            backoff = (backoff * 2).min(Duration::from_millis(250));
                        }
                        _ => {
                            return reject(
                                Problem::new(
                                    ProblemKind::InFlight,
                                    "a request with this key is still being processed; retry after the delay given",
                                )
                                .retry_after(retry_after),
                            );
                        }
                    }
                }
                Ok(Claim::Completed {
                    fingerprint: theirs,
                    payload,
                }) => {
                    inner.gate.on_success();
                    if !print.matches(theirs) {
                        return mismatch();
                    }
                    return match Record::decode(&payload) {
                        Ok(record) => replay(record),
                        Err(e) => corrupt(&e.to_string()),
                    };
                }
            }
        }
    }

    fn store_down(&self, why: &str) -> Begin {
        match self.inner.policy.store_down {
            StoreDown::FailOpen => Begin::PassThrough(PassReason::StoreUnavailable),
            StoreDown::FailClosed => reject(
                Problem::new(
                    ProblemKind::StoreUnavailable,
                    format!("cannot check the idempotency key right now ({why}); retry later with the same key"),
                )
                .retry_after(self.inner.policy.store_retry_after),
            ),
        }
    }
}

/// The response record of `status`, `body` and the response's headers
/// named in `replay` (the allow-list): in the list's order, each name's
/// values in the response's order.
///
/// A response usually has a handful of headers, so they are walked once,
/// each name compared with the list (cheap for standard names), and the
/// kept ones gathered on the stack and ordered by the list: one lookup per
/// allowed name would hash every one of them. A response with many
/// headers is looked up name by name instead.
fn encode_kept(
    status: u16,
    request_id: Option<&str>,
    replay: &[HeaderName],
    headers: &HeaderMap,
    body: &[u8],
) -> Vec<u8> {
    const WALK_UP_TO: usize = 12;
    const ON_STACK: usize = 16;
    // `len` counts values: every kept one fits.
    const _: () = assert!(WALK_UP_TO <= ON_STACK);
    if headers.len() <= WALK_UP_TO {
        let mut kept: [(usize, &str, &[u8]); ON_STACK] = [(0, "", &[]); ON_STACK];
        let mut n = 0;
        for (name, value) in headers {
            if let Some(rank) = replay.iter().position(|r| r == name) {
                kept[n] = (rank, replay[rank].as_str(), value.as_bytes());
                n += 1;
            }
        }
        let kept = &mut kept[..n];
        // Stable: one name's values keep the response's order.
        kept.sort_by_key(|&(rank, ..)| rank);
        let kept = kept.iter().map(|&(_, name, value)| (name, value));
        return codec::encode_response(status, request_id, kept, body);
    }
    let kept: Vec<_> = replay
        .iter()
        .flat_map(|name| {
            headers
                .get_all(name)
                .iter()
                .map(move |v| (name.as_str(), v.as_bytes()))
        })
        .collect();
    codec::encode_response(status, request_id, kept.into_iter(), body)
}

/// BLAKE3 of `parts`, each after its length (8 bytes, big endian), then
/// the byte `last`: the digest in every store key, which must never change
/// (durable stores hold records under it). Short inputs (all usual ones)
/// are laid out on the stack and hashed in one call, which costs BLAKE3 far
/// less than a dozen small updates; longer ones are streamed. Both give the
/// same digest.
fn scope_digest(parts: [&[u8]; 5], last: u8) -> blake3::Hash {
    const ROOM: usize = 512;
    let len = parts.iter().map(|p| 8 + p.len()).sum::<usize>() + 1;
    if len > ROOM {
        let mut h = blake3::Hasher::new();
        for part in parts {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(&[last]);
        return h.finalize();
    }
    let mut buf = [0u8; ROOM];
    let mut at = 0;
    for part in parts {
        buf[at..at + 8].copy_from_slice(&(part.len() as u64).to_be_bytes());
        buf[at + 8..at + 8 + part.len()].copy_from_slice(part);
        at += 8 + part.len();
    }
    buf[at] = last;
    blake3::hash(&buf[..len])
}

/// One request's fingerprint, with what it takes to compare it with a
/// stored fingerprint of the older kind (BLAKE3), should one turn up.
struct Print<'r> {
    current: Fingerprint,
    config: &'r FingerprintConfig,
    head: RequestHead<'r>,
    body: &'r [u8],
}

impl Print<'_> {
    /// Whether `stored` is this request's fingerprint, of either kind.
    fn matches(&self, stored: Fingerprint) -> bool {
        self.config.matches(
            stored,
            self.current,
            self.head.method,
            self.head.uri,
            self.head.headers,
            self.body,
        )
    }
}

fn reject(p: Problem) -> Begin {
    Begin::Reject(p.to_response())
}

fn mismatch() -> Begin {
    reject(Problem::new(
        ProblemKind::FingerprintMismatch,
        "this idempotency key was used for a different request (method, path, query or body differ); use a new key for a new request",
    ))
}

fn corrupt(why: &str) -> Begin {
    // Never fail open on a record we cannot read: it may stand for an
    // operation that already ran.
    reject(
        Problem::new(
            ProblemKind::StoreUnavailable,
            format!("the stored record for this key cannot be read ({why})"),
        )
        .retry_after(Duration::from_secs(60)),
    )
}

fn replay(record: Record) -> Begin {
    match record {
        Record::Response(stored) => {
            let mut response = Response::new(Bytes::from(stored.body));
            *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let headers = response.headers_mut();
            for (name, value) in stored.headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(&value),
                ) {
                    headers.append(n, v);
                }
            }
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            if let Some(v) = stored
                .request_id
                .and_then(|id| HeaderValue::from_str(&id).ok())
            {
                headers.insert(ORIGINAL_REQUEST_ID, v);
            }
            Begin::Replay(response)
        }
        Record::OutcomeUnknown { request_id } => {
            let mut p = Problem::new(
                ProblemKind::OutcomeUnknown,
                "an earlier request with this key may have been processed, but its result was lost; it will not be run again. Check the resource's state, then use a new key if needed",
            );
            p.original_request_id = request_id;
            reject(p)
        }
        Record::TooLarge {
            status,
            request_id,
            body_len,
        } => {
            let mut p = Problem::new(
                ProblemKind::ResponseNotStored,
                format!(
                    "an earlier request with this key was processed (status {status}), but its {body_len}-byte response was too large to keep for replay; it will not be run again"
                ),
            );
            p.original_request_id = request_id;
            reject(p)
        }
    }
}

/// The request id header's value, known to be text.
struct RequestId(HeaderValue);

impl RequestId {
    fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

struct GuardState {
    inner: Arc<Inner>,
    key: StoreKey,
    token: FencingToken,
    request_id: Option<RequestId>,
    started: bool,
    /// When the claim's lease ends at the earliest, by this process's
    /// clock (renewals only move it later).
    leased_until: tokio::time::Instant,
}

/// Holds the claim on a key while the operation runs. See
/// [Finishing a claim](self#finishing-a-claim).
#[must_use = "finish the guard with complete, release or outcome_unknown"]
pub struct Guard {
    state: Option<GuardState>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            Some(s) => f
                .debug_struct("Guard")
                .field("key", &s.key)
                .field("token", &s.token)
                .field("started", &s.started)
                .finish(),
            None => f.write_str("Guard(finished)"),
        }
    }
}

impl Guard {
    /// Records that the operation may now run (call it just before the
    /// request leaves for the upstream or the handler is invoked). From
    /// here on, dropping the guard unfinished locks the key as "outcome
    /// unknown" instead of releasing it.
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(mut guard) = engine.begin(&req, b"").await else { panic!() };
    /// guard.mark_started();
    /// assert!(guard.is_started());
    /// guard.outcome_unknown().await.unwrap();
    /// # });
    /// ```
    pub fn mark_started(&mut self) {
        if let Some(s) = &mut self.state {
            s.started = true;
        }
    }

    /// Whether [`Guard::mark_started`] was called.
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// assert!(!guard.is_started());
    /// guard.release().await.unwrap();
    /// # });
    /// ```
    pub fn is_started(&self) -> bool {
        self.state.as_ref().is_some_and(|s| s.started)
    }

    /// The claim's fencing token.
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// assert!(guard.token().is_some());
    /// guard.release().await.unwrap();
    /// # });
    /// ```
    pub fn token(&self) -> Option<FencingToken> {
        self.state.as_ref().map(|s| s.token)
    }

    /// Extends the claim's lease by the policy's lease from now. A caller
    /// that runs the work itself can call this; [`Guard::hold`] does it on
    /// a timer. [`StoreError::Fenced`] means the lease had already lapsed:
    /// the key is locked as "outcome unknown" (or, with
    /// [`LapsedLease::Rerun`], free for another request), and this guard's
    /// result will not be recorded.
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// guard.renew().await.unwrap();
    /// guard.release().await.unwrap();
    /// # });
    /// ```
    pub async fn renew(&self) -> Result<(), StoreError> {
        match &self.state {
            Some(s) => s.renew().await,
            None => Err(StoreError::Fenced),
        }
    }

    /// True when the claim's lease lasts past `deadline` with room left to
    /// record the outcome (a tenth of the lease, at most a second): work
    /// that is sure to end by `deadline` (it runs under a timeout) then
    /// needs no [`hold`](Self::hold), and costs no timer. The lease is
    /// counted from just before the claim was sent, so never past the
    /// store's own count; a finished guard covers nothing.
    ///
    /// ```
    /// use std::time::Duration;
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
    /// let engine = Engine::new(
    ///     std::sync::Arc::new(MemoryStore::new()),
    ///     Policy::default().with_lease(Duration::from_secs(3)),
    /// );
    /// let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// let now = tokio::time::Instant::now();
    /// assert!(guard.lease_covers(now + Duration::from_secs(2)));
    /// // Work that may take the whole lease must run under `hold`.
    /// assert!(!guard.lease_covers(now + Duration::from_secs(3)));
    /// # guard.release().await.unwrap();
    /// # });
    /// ```
    pub fn lease_covers(&self, deadline: tokio::time::Instant) -> bool {
        self.state.as_ref().is_some_and(|s| {
            let room = (s.inner.policy.lease / 10).min(Duration::from_secs(1));
            deadline + room <= s.leased_until
        })
    }

    /// Runs `work` (the request to the upstream, the handler, the reading
    /// of a slow response body) while renewing the lease every third of
    /// it, so a slow but live request is never taken for a dead one. A
    /// request that finishes within a third of the lease costs no store
    /// call. A renewal the store refuses for being unreachable is tried
    /// again sooner; one refused as fenced ends the renewals (the lease had
    /// lapsed already). `work` runs to its end either way.
    ///
    /// ```
    /// use std::time::Duration;
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
    /// let engine = Engine::new(
    ///     std::sync::Arc::new(MemoryStore::new()),
    ///     Policy::default().with_lease(Duration::from_secs(3)),
    /// );
    /// let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(mut guard) = engine.begin(&req, b"").await else { panic!() };
    /// guard.mark_started();
    /// // Work that takes ten leases: the key stays held, not abandoned.
    /// let answer = guard.hold(async {
    ///     tokio::time::sleep(Duration::from_secs(30)).await;
    ///     "done"
    /// }).await;
    /// assert_eq!(answer, "done");
    /// let ok = http::Response::new("done");
    /// assert_eq!(guard.complete(&ok).await.unwrap(), Completion::Stored);
    /// # });
    /// ```
    pub async fn hold<F: Future>(&self, work: F) -> F::Output {
        match &self.state {
            Some(s) => s.hold(work).await,
            None => work.await,
        }
    }

    /// Finishes with the operation's response, applying the outcome
    /// policy: a response carrying [`NotExecuted`], and the statuses the
    /// policy [releases](Policy::releases) (408, 409, 425, 429, 5xx on
    /// routes that release them, the route's own list), release the claim;
    /// a body over the limit stores a "too large" record; anything else is
    /// stored for replay with its allow-listed headers.
    ///
    /// Deliver the response to the client whatever this returns. An error
    /// means the result could not be recorded: [`StoreError::Fenced`] if
    /// the lease had lapsed already, or the store being down past the
    /// policy's `record_retry` (the claim then lapses when its lease ends,
    /// which locks the key as "outcome unknown").
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// let busy = http::Response::builder().status(429).body("slow down").unwrap();
    /// assert_eq!(guard.complete(&busy).await.unwrap(), Completion::Released);
    ///
    /// // A handler that says it never ran releases the key whatever its status.
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// let refused = http::Response::builder().status(502).extension(NotExecuted).body("").unwrap();
    /// assert_eq!(guard.complete(&refused).await.unwrap(), Completion::Released);
    /// # });
    /// ```
    pub async fn complete<B: AsRef<[u8]>>(
        self,
        response: &Response<B>,
    ) -> Result<Completion, StoreError> {
        if response.extensions().get::<NotExecuted>().is_some() {
            return self.release().await.map(|()| Completion::Released);
        }
        self.complete_parts(
            response.status(),
            response.headers(),
            response.body().as_ref(),
        )
        .await
    }

    /// [`Guard::complete`] from the response's pieces (a caller holding
    /// the extensions checks [`NotExecuted`] itself and calls
    /// [`Guard::release`]).
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// let done = guard.complete_parts(http::StatusCode::OK, &http::HeaderMap::new(), b"ok").await;
    /// assert_eq!(done.unwrap(), Completion::Stored);
    /// # });
    /// ```
    pub async fn complete_parts(
        mut self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Completion, StoreError> {
        let Some(s) = self.state.take() else {
            return Err(StoreError::Fenced);
        };
        let policy = &s.inner.policy;
        if policy.releases(status) {
            return s.release().await.map(|()| Completion::Released);
        }
        if body.len() > policy.max_response {
            let record = Record::TooLarge {
                status: status.as_u16(),
                request_id: s.request_id(),
                body_len: body.len() as u64,
            };
            return s.store(&record).await.map(|()| Completion::TooLarge);
        }
        // Encoded straight from the response: no owned copy of the kept
        // headers and the body before the payload.
        let payload = encode_kept(
            status.as_u16(),
            s.request_id_str(),
            &policy.replay_headers,
            headers,
            body,
        );
        match s.store_payload(payload).await {
            Ok(()) => Ok(Completion::Stored),
            Err(StoreError::Full(_)) => {
                // No room for the response: record that the operation ran
                // (a small record a full store still takes), so a retry
                // gets a 409 instead of running it again.
                let ran = Record::TooLarge {
                    status: status.as_u16(),
                    request_id: s.request_id(),
                    body_len: body.len() as u64,
                };
                s.store(&ran).await.map(|()| Completion::TooLarge)
            }
            Err(e) => Err(e),
        }
    }

    /// Finishes with a response too large to buffer (a gateway that
    /// streamed it): records that the operation ran with `status` and a
    /// body of `body_len` bytes, unless the status releases the claim.
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// assert_eq!(guard.complete_unbuffered(http::StatusCode::OK, 5 << 20).await.unwrap(), Completion::TooLarge);
    /// # });
    /// ```
    pub async fn complete_unbuffered(
        mut self,
        status: StatusCode,
        body_len: u64,
    ) -> Result<Completion, StoreError> {
        let Some(s) = self.state.take() else {
            return Err(StoreError::Fenced);
        };
        if s.inner.policy.releases(status) {
            return s.release().await.map(|()| Completion::Released);
        }
        let record = Record::TooLarge {
            status: status.as_u16(),
            request_id: s.request_id(),
            body_len,
        };
        s.store(&record).await.map(|()| Completion::TooLarge)
    }

    /// Gives the key up: the operation did not run (refused before it
    /// started), so a retry may run it.
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// guard.release().await.unwrap();
    /// assert!(matches!(engine.begin(&req, b"").await, Begin::Execute(_)));
    /// # });
    /// ```
    pub async fn release(mut self) -> Result<(), StoreError> {
        match self.state.take() {
            Some(s) => s.release().await,
            None => Err(StoreError::Fenced),
        }
    }

    /// Locks the key as "outcome unknown": the operation may have run but
    /// its result is lost. Retries get a 409 problem, never a re-run.
    ///
    /// ```
    /// # use keel_idempotency::{engine::*, memory::MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// # let engine = Engine::new(std::sync::Arc::new(MemoryStore::new()), Policy::default());
    /// # let req = http::Request::post("/x").header("authorization", "Bearer alice").header("idempotency-key", "k").body(()).unwrap();
    /// let Begin::Execute(guard) = engine.begin(&req, b"").await else { panic!() };
    /// guard.outcome_unknown().await.unwrap();
    /// let Begin::Reject(p) = engine.begin(&req, b"").await else { panic!() };
    /// assert_eq!(p.status(), 409);
    /// # });
    /// ```
    pub async fn outcome_unknown(mut self) -> Result<(), StoreError> {
        match self.state.take() {
            Some(s) => s.outcome_unknown().await,
            None => Err(StoreError::Fenced),
        }
    }
}

impl GuardState {
    fn request_id_str(&self) -> Option<&str> {
        self.request_id.as_ref().map(RequestId::as_str)
    }

    fn request_id(&self) -> Option<String> {
        self.request_id_str().map(str::to_owned)
    }

    fn lease(&self) -> Lease {
        self.inner.policy.store_lease()
    }

    async fn renew(&self) -> Result<(), StoreError> {
        let r = self
            .inner
            .store
            .renew(&self.key, self.token, self.lease())
            .await;
        self.report(&r);
        r
    }

    async fn hold<F: Future>(&self, work: F) -> F::Output {
        let every = (self.inner.policy.lease / 3).max(Duration::from_millis(1));
        let lease = self.lease();
        let mut work = std::pin::pin!(work);
        // The timer is made only once the work has to wait: work that is
        // ready at once (a response body already buffered) costs no timer.
        let mut tick = std::pin::pin!(None::<tokio::time::Sleep>);
        let mut renewal: Option<crate::store::BoxFuture<'_, Result<(), StoreError>>> = None;
        let mut lost = false;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            if tick.is_none() {
                tick.set(Some(tokio::time::sleep(every)));
            }
            let Some(mut sleep) = tick.as_mut().as_pin_mut() else {
                return Poll::Pending;
            };
            loop {
                if let Some(r) = renewal.as_mut() {
                    let Poll::Ready(result) = r.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    renewal = None;
                    self.report(&result);
                    let next = match result {
                        Ok(()) => every,
                        // The store is unreachable: try again well before
                        // the lease runs out.
                        Err(StoreError::Unavailable(_) | StoreError::Full(_)) => every / 4,
                        // Lapsed already (or unreadable): nothing to keep.
                        Err(StoreError::Fenced | StoreError::Corrupt(_)) => {
                            lost = true;
                            every
                        }
                    };
                    sleep.as_mut().reset(tokio::time::Instant::now() + next);
                }
                if lost {
                    return Poll::Pending;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        renewal = Some(self.inner.store.renew(&self.key, self.token, lease));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }

    async fn store(&self, record: &Record) -> Result<(), StoreError> {
        self.store_payload(record.encode()).await
    }

    async fn store_payload(&self, payload: Vec<u8>) -> Result<(), StoreError> {
        let ttl = self.inner.policy.ttl;
        let store = &self.inner.store;
        let payload = match store.complete_now(&self.key, self.token, payload, ttl) {
            // A store that answers at once has no connection to lose: its
            // answer is final, with nothing to retry.
            Ok(done) => {
                self.report(&done);
                return done;
            }
            Err(payload) => payload,
        };
        self.persist(|| store.complete(&self.key, self.token, &payload, ttl))
            .await
    }

    async fn release(&self) -> Result<(), StoreError> {
        self.persist(|| self.inner.store.release(&self.key, self.token))
            .await
    }

    async fn outcome_unknown(&self) -> Result<(), StoreError> {
        self.store(&Record::OutcomeUnknown {
            request_id: self.request_id(),
        })
        .await
    }

    /// Writes an outcome, retrying while the store is unreachable, with
    /// capped full-jitter backoff, for up to the policy's `record_retry`.
    /// If it still fails, the claim stays until its lease lapses, and then
    /// locks the key ([`LapsedLease::Lock`]): a lost write never frees a
    /// key whose request may have run.
    async fn persist<'s, F>(&'s self, write: F) -> Result<(), StoreError>
    where
        F: Fn() -> crate::store::BoxFuture<'s, Result<(), StoreError>>,
    {
        let result = write().await;
        self.report(&result);
        if !matches!(result, Err(StoreError::Unavailable(_))) {
            return result;
        }
        // Boxed: retries are rare, and their timer and backoff would
        // otherwise make every completion's future larger.
        Box::pin(self.retry_write(result, write)).await
    }

    /// The retries of [`GuardState::persist`], after the first `result`.
    async fn retry_write<'s, F>(
        &'s self,
        mut result: Result<(), StoreError>,
        write: F,
    ) -> Result<(), StoreError>
    where
        F: Fn() -> crate::store::BoxFuture<'s, Result<(), StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.policy.record_retry;
        let mut delays = Backoff::exponential(Duration::from_millis(50))
            .cap(Duration::from_secs(1))
            .jitter(Jitter::Full)
            .iter();
        for delay in delays.by_ref() {
            let wake = tokio::time::Instant::now() + delay;
            if wake > deadline {
                break;
            }
            tokio::time::sleep_until(wake).await;
            result = write().await;
            self.report(&result);
            if !matches!(result, Err(StoreError::Unavailable(_))) {
                break;
            }
        }
        result
    }

    fn report<T>(&self, r: &Result<T, StoreError>) {
        match r {
            Err(StoreError::Unavailable(_)) => self.inner.gate.on_failure(),
            _ => self.inner.gate.on_success(),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(s) = self.state.take() else { return };
        // Drop cannot await; finish on the runtime if there is one. If there
        // is none, the claim lapses at the end of its lease (and locks the
        // key if it was started).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = if s.started {
                    s.outcome_unknown().await
                } else {
                    s.release().await
                };
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store key's digest as every earlier version computed it: a
    /// record stored then must be found under the same key now.
    fn streamed(parts: [&[u8]; 5], last: u8) -> blake3::Hash {
        let mut h = blake3::Hasher::new();
        for part in parts {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(&[last]);
        h.finalize()
    }

    #[test]
    fn kept_headers_follow_the_allow_list_walked_or_looked_up() {
        // Each allowed name's values in the response's order, the names in
        // the list's order, whatever order the response has them in.
        let replay = Policy::default().replay_headers().to_vec();
        for extra in [0, 20] {
            let mut headers = HeaderMap::new();
            headers.append("etag", HeaderValue::from_static("\"1\""));
            headers.append("set-cookie", HeaderValue::from_static("s=1"));
            headers.append("content-type", HeaderValue::from_static("text/plain"));
            headers.append("cache-control", HeaderValue::from_static("no-store"));
            headers.append("cache-control", HeaderValue::from_static("private"));
            for i in 0..extra {
                headers.append(
                    HeaderName::from_bytes(format!("x-{i}").as_bytes()).expect("name"),
                    HeaderValue::from_static("v"),
                );
            }
            let record = Record::decode(&encode_kept(201, Some("r"), &replay, &headers, b"ok"))
                .expect("decodes");
            let Record::Response(stored) = record else {
                panic!("a response record")
            };
            let kept: Vec<_> = stored
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect();
            assert_eq!(
                kept,
                [
                    ("content-type", b"text/plain".as_slice()),
                    ("etag", b"\"1\""),
                    ("cache-control", b"no-store"),
                    ("cache-control", b"private"),
                ],
                "{extra} more headers"
            );
            assert_eq!(
                (stored.status, stored.body.as_slice()),
                (201, b"ok".as_slice())
            );
        }
    }

    #[test]
    fn store_key_digests_are_unchanged_whatever_the_input_length() {
        let long_path = "/p".repeat(400);
        for (tenant, path, key, last) in [
            (b"Bearer alice".as_slice(), "/orders", "8e03978e-40d5", 1),
            (b"".as_slice(), "/", "k", 0),
            (b"Bearer bob".as_slice(), long_path.as_str(), "k", 1),
            (&[7u8; 300][..], "/orders", &"x".repeat(255), 1),
        ] {
            let parts = [
                b"keel-idempotency-key-v1".as_slice(),
                tenant,
                b"POST".as_slice(),
                path.as_bytes(),
                key.as_bytes(),
            ];
            assert_eq!(scope_digest(parts, last), streamed(parts, last));
        }
        // Pinned: the key of one request, as earlier versions wrote it.
        let parts = [
            b"keel-idempotency-key-v1".as_slice(),
            b"Bearer alice",
            b"POST",
            b"/orders",
            b"order-1",
        ];
        let pinned = "496e598fe0e6227424f47bff200f143ea69deb44c39d383d1d189e3d44159881";
        assert_eq!(streamed(parts, 1).to_hex().as_str(), pinned);
        assert_eq!(scope_digest(parts, 1).to_hex().as_str(), pinned);
    }
}
