//! An axum payments service made exactly-once with keel-idempotency.
//!
//! - `POST /payments` requires an `Idempotency-Key` and a session cookie
//!   (`Cookie: session=<id>`). The [`authenticate`] middleware turns the
//!   session into a [`CurrentUser`] in the request's extensions, and the
//!   idempotency layer scopes keys to that user ([`tenant`]): two users
//!   with the same key and body each get their own payment, never each
//!   other's replay. A keyed request without a valid session gets 400
//!   `urn:keel:problem:idempotency-tenant-missing`.
//! - The handler charges through [`outbound::Outbound`] (keel-breaker and
//!   keel-retry). When the charge certainly did not happen (breaker open,
//!   connection refused) it answers 503 with the
//!   [`NotExecuted`] extension: the key is released and the client's
//!   retry with the same key runs. When the charge may have happened
//!   (the answer was lost), its 502 is stored and replayed: a retry never
//!   charges twice.
//!
//! ```
//! use keel_example_axum_payments::{app, outbound::{Outbound, Provider}, Sessions};
//! let router: axum::Router = app(
//!     Sessions::new([("s-alice", "alice"), ("s-bob", "bob")]),
//!     Outbound::new(Provider::new()),
//! );
//! ```

pub mod outbound;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use keel_idempotency::{
    Engine, IdempotencyLayer, MemoryStore, NotExecuted, Policy, RequestHead, Tenant,
};

use crate::outbound::{Charge, Outbound};

/// The authenticated caller, put into the request's extensions by
/// [`authenticate`].
///
/// ```
/// let user = keel_example_axum_payments::CurrentUser("alice".into());
/// assert_eq!(user.0, "alice");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentUser(pub String);

/// Session ids and their users: a stand-in for a session store.
///
/// ```
/// use keel_example_axum_payments::Sessions;
/// let sessions = Sessions::new([("s-1", "alice")]);
/// assert_eq!(sessions.user("s-1"), Some("alice"));
/// assert_eq!(sessions.user("s-2"), None);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Sessions(Arc<HashMap<String, String>>);

impl Sessions {
    /// Sessions from `(session id, user)` pairs.
    ///
    /// ```
    /// let sessions = keel_example_axum_payments::Sessions::new([("s-1", "alice")]);
    /// ```
    pub fn new<S: Into<String>, U: Into<String>>(pairs: impl IntoIterator<Item = (S, U)>) -> Self {
        Self(Arc::new(
            pairs
                .into_iter()
                .map(|(s, u)| (s.into(), u.into()))
                .collect(),
        ))
    }

    /// The user a session id belongs to.
    ///
    /// ```
    /// assert_eq!(keel_example_axum_payments::Sessions::default().user("x"), None);
    /// ```
    pub fn user(&self, session: &str) -> Option<&str> {
        self.0.get(session).map(String::as_str)
    }
}

/// The `session` cookie's value, from any `Cookie` header.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix("session="))
}

/// The authentication middleware: a known session cookie puts its
/// [`CurrentUser`] into the request's extensions. Requests without one go
/// on without a user; the idempotency layer refuses keyed ones, and the
/// handler answers 401 to the rest.
///
/// ```
/// use keel_example_axum_payments::{authenticate, Sessions};
/// let sessions = Sessions::new([("s-1", "alice")]);
/// let app: axum::Router = axum::Router::new()
///     .route("/me", axum::routing::get(|| async { "hello" }))
///     .layer(axum::middleware::from_fn_with_state(sessions, authenticate));
/// ```
pub async fn authenticate(
    State(sessions): State<Sessions>,
    mut request: Request,
    next: Next,
) -> Response {
    let user = session_cookie(request.headers())
        .and_then(|id| sessions.user(id))
        .map(|user| CurrentUser(user.to_owned()));
    if let Some(user) = user {
        request.extensions_mut().insert(user);
    }
    next.run(request).await
}

/// The idempotency tenant: the user [`authenticate`] found, read from the
/// request's extensions.
///
/// ```
/// use keel_example_axum_payments::{tenant, CurrentUser};
/// use keel_idempotency::{RequestHead, Tenant};
/// let Tenant::Function(read) = tenant() else { unreachable!() };
/// let request = axum::http::Request::post("/payments").extension(CurrentUser("bob".into())).body(()).unwrap();
/// assert_eq!(read(&RequestHead::from(&request)).as_deref(), Some("bob"));
/// ```
pub fn tenant() -> Tenant {
    Tenant::function(|head: &RequestHead<'_>| {
        head.extensions
            .get::<CurrentUser>()
            .map(|user| user.0.clone())
    })
}

async fn create_payment(State(outbound): State<Outbound>, request: Request) -> Response {
    let Some(CurrentUser(user)) = request.extensions().get::<CurrentUser>().cloned() else {
        return (StatusCode::UNAUTHORIZED, "log in first").into_response();
    };
    let body = match axum::body::to_bytes(request.into_body(), 64 << 10).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => return (StatusCode::BAD_REQUEST, "unreadable body").into_response(),
    };
    match outbound.charge(&user, &body).await {
        Charge::Done(payment) => (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{{\"payment\":{payment},\"user\":\"{user}\"}}"),
        )
            .into_response(),
        Charge::NotSent { retry_after } => {
            // Nothing was charged: say so, so the key is released and the
            // client's retry with the same key runs.
            let seconds = retry_after.map_or(1, |d| d.as_secs().max(1));
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, HeaderValue::from(seconds))],
                axum::Extension(NotExecuted),
                "the payment provider is unavailable; nothing was charged, retry with the same key",
            )
                .into_response()
        }
        // The charge may have been made: this answer is recorded and
        // replayed, so a retry never charges twice.
        Charge::Unknown(why) => (
            StatusCode::BAD_GATEWAY,
            format!("the payment provider's answer was lost ({why}); check the payment before paying again"),
        )
            .into_response(),
    }
}

/// The service: `POST /payments` behind the idempotency layer, behind the
/// session middleware (the layer added last runs first, so the user is
/// in the extensions when the idempotency layer reads the tenant).
///
/// ```
/// use keel_example_axum_payments::{app, outbound::{Outbound, Provider}, Sessions};
/// let router = app(Sessions::default(), Outbound::new(Provider::new()));
/// ```
pub fn app(sessions: Sessions, outbound: Outbound) -> Router {
    let engine = Engine::new(
        Arc::new(MemoryStore::new()),
        Policy::default().with_required(true).with_tenant(tenant()),
    );
    Router::new()
        .route("/payments", post(create_payment))
        .with_state(outbound)
        .layer(IdempotencyLayer::new(engine))
        .layer(middleware::from_fn_with_state(sessions, authenticate))
}
