//! The checks `keel check` runs on a parsed [`Config`], each error at the
//! `FILE:LINE:COL` of the value it is about. Checks that parse a value
//! (an address, an endpoint URL, a method, a header name, a route's
//! upstream, what a store kind needs) hand the parsed value on in
//! [`Checked`], so the conversion to
//! a [`crate::Spec`] has nothing left that could fail.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, Method};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::schema::{
    BreakerConfig, Config, DrainConfig, HealthCheckConfig, RetryConfig, StoreConfig, StoreKind,
};
use crate::spec::{EndpointSpec, StoreBackend};
use crate::{ConfigError, line_col};

/// What the checks parsed, for the conversion; only built when every
/// value it holds parsed (and then any error is elsewhere).
pub(crate) struct Checked {
    /// `server.listen`.
    pub listen: SocketAddr,
    /// `server.admin_listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `[store]`: the store kind with its settings.
    pub store: StoreBackend,
    /// Each upstream's endpoints, in `config.upstreams` order.
    pub endpoints: Vec<Vec<EndpointSpec>>,
    /// What each route (in file order) names, parsed.
    pub routes: Vec<CheckedRoute>,
}

/// The parsed values of one `[[routes]]`.
pub(crate) struct CheckedRoute {
    /// Index of its upstream in `config.upstreams` order.
    pub upstream: usize,
    /// `methods`, when written.
    pub methods: Option<Vec<Method>>,
    /// `idempotency.methods` and `idempotency.tenant_header`, when the
    /// table is written.
    pub idempotency: Option<(Vec<Method>, HeaderName)>,
}

/// One step of a key path in the file: a table key or an array index.
#[derive(Debug, Clone, Copy)]
enum Seg<'k> {
    Key(&'k str),
    Index(usize),
}

impl<'k> From<&'k str> for Seg<'k> {
    fn from(key: &'k str) -> Self {
        Seg::Key(key)
    }
}

impl From<usize> for Seg<'_> {
    fn from(index: usize) -> Self {
        Seg::Index(index)
    }
}

/// A key path, as `at!["routes", 0, "idempotency", "ttl"]`.
macro_rules! at {
    ($($seg:expr),+ $(,)?) => {
        &[$(Seg::from($seg)),+]
    };
}

/// Collects semantic errors with their spans.
pub(crate) struct Checker<'a> {
    pub file: &'a Path,
    pub source: &'a str,
    /// The document as parsed, to find where a key was written.
    pub doc: &'a DeTable<'a>,
    pub errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.source, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            col,
            message: message.into(),
        });
    }

    /// The value written at `path`, if it is written.
    fn value(&self, path: &[Seg<'_>]) -> Option<&Spanned<DeValue<'_>>> {
        let mut value: Option<&Spanned<DeValue<'_>>> = None;
        for seg in path {
            value = match (seg, value.map(Spanned::get_ref)) {
                (Seg::Key(key), None) => self.doc.get(*key),
                (Seg::Key(key), Some(DeValue::Table(table))) => table.get(*key),
                (Seg::Index(i), Some(DeValue::Array(array))) => array.get(*i),
                _ => None,
            };
            value?;
        }
        value
    }

    /// Where the value at `path` is written. A key left out (its default
    /// is in use) points at the nearest table on its path that is written,
    /// or at the start of the file.
    fn span(&self, path: &[Seg<'_>]) -> Range<usize> {
        (0..=path.len())
            .rev()
            .find_map(|n| self.value(&path[..n]).map(Spanned::span))
            .unwrap_or(0..0)
    }

    /// Whether `path` is written in the file.
    fn written(&self, path: &[Seg<'_>]) -> bool {
        self.value(path).is_some()
    }

    /// An error at the value written at `path`.
    fn error_at(&mut self, path: &[Seg<'_>], message: impl Into<String>) {
        let span = self.span(path);
        self.error(span, message);
    }

    /// The duration at `path` (named `name` in the message) must not be
    /// zero; `why` says what zero would do.
    fn above_zero(&mut self, path: &[Seg<'_>], name: &str, value: Duration, why: &str) {
        if value.is_zero() {
            self.error_at(path, format!("{name} must be above zero: {why}"));
        }
    }
}

/// Most worker threads `server.workers` may ask for: far more than any
/// machine has cores, far fewer than would exhaust memory (each thread
/// reserves a stack, and the runtime per-thread queues).
pub const MAX_WORKERS: usize = 1024;

/// Bounds of `server.max_header_size`: hyper needs room for a request
/// line, and a head of a megabyte is an attack, not a request.
const HEADER_SIZE_RANGE: std::ops::RangeInclusive<u64> = 1024..=(1 << 20);

/// The methods routes may name: those of RFC 9110 and PATCH (RFC 5789).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn check_addr(c: &mut Checker<'_>, key: &str, value: &Spanned<String>) -> Option<SocketAddr> {
    let addr = value.get_ref().parse::<SocketAddr>().ok();
    if addr.is_none() {
        c.error(
            value.span(),
            format!(
                "{key} = {:?} is not an address; write IP:PORT such as \"127.0.0.1:8080\"",
                value.get_ref()
            ),
        );
    }
    addr
}

/// Whether two listeners would fight over one socket: the same port
/// (other than 0, "any free port") on the same address, or on an
/// unspecified address that covers the other (`0.0.0.0` covers IPv4,
/// `[::]` both families, as Linux binds it dual-stack).
fn addrs_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (a, b) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers = |x: std::net::IpAddr, y: std::net::IpAddr| {
        x.is_unspecified() && (x.is_ipv6() || y.is_ipv4())
    };
    a == b || covers(a, b) || covers(b, a)
}

/// Checks a method name; returns it parsed when it is one of [`METHODS`].
fn check_method(c: &mut Checker<'_>, method: &Spanned<String>) -> Option<Method> {
    let text = method.get_ref();
    if METHODS.contains(&text.as_str())
        && let Ok(parsed) = Method::from_bytes(text.as_bytes())
    {
        return Some(parsed);
    }
    let upper = text.to_ascii_uppercase();
    let message = if METHODS.contains(&upper.as_str()) {
        format!("{text:?} is not an HTTP method; write it in capitals: {upper:?}")
    } else {
        format!(
            "{text:?} is not an HTTP method; use one of {}",
            METHODS.join(", ")
        )
    };
    // A default (span 0..0) is always valid, so this is a written value.
    c.error(method.span(), message);
    None
}

/// Checks every method of a list; returns them all parsed when they are.
fn check_methods(c: &mut Checker<'_>, methods: &[Spanned<String>]) -> Option<Vec<Method>> {
    let parsed: Vec<Option<Method>> = methods.iter().map(|m| check_method(c, m)).collect();
    parsed.into_iter().collect()
}

/// Checks an upstream endpoint URL; returns its scheme-less authority on success.
fn endpoint_authority(url: &str) -> Result<http::uri::Authority, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL ({e}); write \"http://host:port\""))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{url:?}: https upstreams are not supported yet; use http://"
            ));
        }
        _ => return Err(format!("{url:?}: write the URL as \"http://host:port\"")),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{url:?}: an endpoint is scheme, host and port only; the request path is kept as sent"
        ));
    }
    uri.authority()
        .cloned()
        .ok_or_else(|| format!("{url:?}: missing host"))
}

/// An error and its causes, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What is wrong with a Redis URL, as the store opens it
/// (`redis::Client::open` parses without connecting), as a predicate for
/// "store.url ..."; never repeats the URL, which may hold a password.
fn redis_url_error(url: &str) -> Option<String> {
    if url.starts_with("rediss://") {
        return Some(
            "uses TLS (rediss://), which this build does not support; use redis://".to_owned(),
        );
    }
    if !url.starts_with("redis://") {
        return Some("must start with redis://".to_owned());
    }
    let error = redis::Client::open(url).err()?;
    Some(format!(
        "is not a Redis URL the store can open ({})",
        redis_reason(&error)
    ))
}

/// A Redis error without the " - InvalidClientConfig" its text carries.
fn redis_reason(error: &redis::RedisError) -> String {
    chain(error).replace(&format!(" - {:?}", error.kind()), "")
}

/// What is wrong with a PostgreSQL URL, as the store opens it:
/// `tokio_postgres::Config` parses it, and connecting needs a host and as
/// many ports as hosts (or one).
fn postgres_url_error(url: &str) -> Option<String> {
    if !["postgres://", "postgresql://"]
        .iter()
        .any(|s| url.starts_with(s))
    {
        return Some("must start with postgres:// or postgresql://".to_owned());
    }
    let problem = match url.parse::<tokio_postgres::Config>() {
        Err(e) => chain(&e),
        Ok(config) => {
            let hosts = config.get_hosts().len().max(config.get_hostaddrs().len());
            let ports = config.get_ports().len();
            if hosts == 0 {
                "it names no host".to_owned()
            } else if ports > 1 && ports != hosts {
                format!("it names {hosts} hosts but {ports} ports")
            } else {
                return None;
            }
        }
    };
    Some(format!(
        "is not a PostgreSQL URL the store can open ({problem})"
    ))
}

/// The rule `RedisStore` holds key prefixes to.
fn redis_prefix_ok(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
}

/// Runs every check, recording each error in `c`; returns what the checks
/// parsed when all of it parsed (`None` only when an error was recorded).
pub(crate) fn validate(config: &Config, c: &mut Checker<'_>) -> Option<Checked> {
    let addrs = validate_server(config, c);
    let store = validate_store(&config.store, c);
    let endpoints = validate_upstreams(config, c);
    let routes = validate_routes(config, c);
    validate_drain(&config.drain, c);
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        c.error_at(
            at!["log", "level"],
            format!(
                "log.level {:?} is not a log filter ({e}); write a level such as \"info\" or directives such as \"keel=debug,info\"",
                config.log.level
            ),
        );
    }
    let (listen, admin_listen) = addrs?;
    Some(Checked {
        listen,
        admin_listen,
        store: store?,
        endpoints: endpoints?,
        routes: routes?,
    })
}

/// Checks `[server]`; returns `listen` and `admin_listen` when they parse.
fn validate_server(
    config: &Config,
    c: &mut Checker<'_>,
) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let server = &config.server;
    let listen = check_addr(c, "listen", &server.listen);
    let admin_addr = server
        .admin_listen
        .as_ref()
        .map(|admin| check_addr(c, "admin_listen", admin));
    if let Some(admin) = &server.admin_listen
        && let Some(Some(admin_addr)) = admin_addr
        && let Some(listen) = listen
        && addrs_overlap(admin_addr, listen)
    {
        c.error(
            admin.span(),
            format!(
                "admin_listen {:?} takes the same port as listen {:?}; give the admin API a port of its own",
                admin.get_ref(),
                server.listen.get_ref()
            ),
        );
    }
    if server.workers > MAX_WORKERS {
        c.error_at(
            at!["server", "workers"],
            format!(
                "server.workers = {} is too many; use at most {MAX_WORKERS}, or 0 for one per core",
                server.workers
            ),
        );
    }
    c.above_zero(
        at!["server", "idle_timeout"],
        "server.idle_timeout",
        server.idle_timeout.get_ref().0,
        "\"0s\" closes every connection before its request is read (the default is \"60s\")",
    );
    for (key, timeout, why) in [
        (
            "header_read_timeout",
            &server.header_read_timeout,
            "\"0s\" closes every connection before its request head is read (the default is \"10s\")",
        ),
        (
            "http2_keep_alive_interval",
            &server.http2_keep_alive_interval,
            "it is how often an idle HTTP/2 connection is pinged",
        ),
        (
            "http2_keep_alive_timeout",
            &server.http2_keep_alive_timeout,
            "\"0s\" would drop every HTTP/2 connection at its first ping",
        ),
    ] {
        c.above_zero(
            at!["server", key],
            &format!("server.{key}"),
            timeout.get_ref().0,
            why,
        );
    }
    if *server.admin_max_connections.get_ref() == 0 {
        c.error(
            server.admin_max_connections.span(),
            "server.admin_max_connections must be at least 1",
        );
    }
    if !HEADER_SIZE_RANGE.contains(&server.max_header_size.0) {
        c.error_at(
            at!["server", "max_header_size"],
            "server.max_header_size must be between 1KiB and 1MiB (the default is \"16KiB\")",
        );
    }
    let budget = server.buffer_budget.get_ref().0;
    let largest_keyed_body = config
        .routes
        .iter()
        .filter_map(|r| r.idempotency.as_ref().filter(|i| i.enabled))
        .map(|i| i.max_body.0)
        .max();
    if let Some(largest) = largest_keyed_body
        && budget <= largest
    {
        c.error(
            server.buffer_budget.span(),
            format!(
                "server.buffer_budget ({budget} bytes) must be above the largest idempotent route's max_body ({largest} bytes), or every such body is refused"
            ),
        );
    }
    // `Some(None)` (written, did not parse) has its error recorded.
    let admin_listen = match admin_addr {
        None => None,
        Some(addr) => Some(addr?),
    };
    Some((listen?, admin_listen))
}

/// Checks `[store]`; returns the store it describes, with the settings its
/// kind takes, when it has what that kind needs.
fn validate_store(store: &StoreConfig, c: &mut Checker<'_>) -> Option<StoreBackend> {
    let kind = *store.kind.get_ref();
    if let Some(durable) = &store.durable_claims
        && kind != StoreKind::Embedded
    {
        c.error(
            durable.span(),
            "store.durable_claims is only used by kind = \"embedded\"; remove it",
        );
    }
    if let Some(path) = &store.path {
        if kind != StoreKind::Embedded {
            c.error_at(
                at!["store", "path"],
                "store.path is only used by kind = \"embedded\"; remove it",
            );
        } else if path.trim().is_empty() {
            c.error_at(
                at!["store", "path"],
                "store.path is empty; name a directory such as \"keel-data\"",
            );
        }
    }
    let memory_limits = [
        ("max_bytes", &store.max_bytes),
        ("max_bytes_per_tenant", &store.max_bytes_per_tenant),
    ];
    for (key, limit) in memory_limits {
        // A span of 0..0 is the default: only a value written in the file
        // is questioned.
        let written = limit.span() != (0..0);
        if written && kind != StoreKind::Memory {
            c.error(
                limit.span(),
                format!("store.{key} is only used by kind = \"memory\"; remove it"),
            );
        } else if limit.get_ref().0 < 1024 {
            c.error(limit.span(), format!("store.{key} must be at least 1KiB"));
        }
    }
    if store.max_bytes_per_tenant.get_ref().0 > store.max_bytes.get_ref().0 {
        c.error(
            store.max_bytes_per_tenant.span(),
            "store.max_bytes_per_tenant cannot be above store.max_bytes",
        );
    }
    c.above_zero(
        at!["store", "timeout"],
        "store.timeout",
        store.timeout.0,
        "no store operation could finish (the default is \"2s\")",
    );
    if kind == StoreKind::Redis && !redis_prefix_ok(&store.prefix) {
        c.error_at(
            at!["store", "prefix"],
            format!(
                "store.prefix {:?} cannot prefix Redis keys; use 1 to 64 printable ASCII characters without spaces, '{{' or '}}'",
                store.prefix
            ),
        );
    }
    if let Some(nodes) = &store.cluster_nodes {
        if kind != StoreKind::Redis {
            c.error(
                nodes.span(),
                "store.cluster_nodes is only used by kind = \"redis\"; remove it",
            );
        } else if let Some(url) = &store.url {
            c.error(
                url.span(),
                "give either store.url (one Redis server) or store.cluster_nodes (a Redis Cluster), not both",
            );
        } else if nodes.get_ref().is_empty() {
            c.error(nodes.span(), "store.cluster_nodes needs at least one node");
        }
        let mut all_ok = true;
        for node in nodes.get_ref() {
            if let Some(problem) = redis_url_error(node.get_ref()) {
                all_ok = false;
                c.error(
                    node.span(),
                    format!("a cluster node {problem}; write \"redis://HOST:PORT/\""),
                );
            }
        }
        if all_ok
            && kind == StoreKind::Redis
            && !nodes.get_ref().is_empty()
            && let Err(e) = redis::cluster::ClusterClientBuilder::new(
                nodes.get_ref().iter().map(|n| n.get_ref().as_str()),
            )
            .build()
        {
            c.error(
                nodes.span(),
                format!(
                    "store.cluster_nodes do not make one cluster client ({}); give every node the same user and password, and no database number",
                    redis_reason(&e)
                ),
            );
        }
    }
    match kind {
        StoreKind::Memory | StoreKind::Embedded => {
            if let Some(url) = &store.url {
                c.error(
                    url.span(),
                    "store.url is only used by kind = \"redis\" or \"postgres\"; remove it",
                );
            }
        }
        // A cluster's nodes stand in for the URL (checked above).
        StoreKind::Redis if store.cluster_nodes.is_some() => {}
        StoreKind::Redis | StoreKind::Postgres => {
            let (problem, example) = if kind == StoreKind::Redis {
                (
                    store.url.as_ref().map(|u| redis_url_error(u.get_ref())),
                    "redis://[:PASSWORD@]HOST:PORT/[DB]",
                )
            } else {
                (
                    store.url.as_ref().map(|u| postgres_url_error(u.get_ref())),
                    "postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
                )
            };
            match (&store.url, problem.flatten()) {
                (None, _) => c.error(
                    store.kind.span(),
                    format!("this store kind needs url = \"{example}\""),
                ),
                (Some(url), Some(problem)) => c.error(
                    url.span(),
                    format!("store.url {problem}; write \"{example}\""),
                ),
                (Some(_), None) => {}
            }
        }
    }
    let url = store.url.as_ref().map(|u| u.get_ref().clone());
    let prefix = store.prefix.clone();
    match kind {
        StoreKind::Memory => Some(StoreBackend::Memory {
            max_bytes: saturating_usize(store.max_bytes.get_ref().0),
            max_bytes_per_tenant: saturating_usize(store.max_bytes_per_tenant.get_ref().0),
        }),
        StoreKind::Embedded => Some(StoreBackend::Embedded {
            path: store.embedded_path(),
            durable_claims: store.durable_claims(),
        }),
        // Nodes and a URL together, or neither, were reported above.
        StoreKind::Redis => match &store.cluster_nodes {
            Some(nodes) => Some(StoreBackend::RedisCluster {
                nodes: nodes
                    .get_ref()
                    .iter()
                    .map(|n| n.get_ref().clone())
                    .collect(),
                prefix,
            }),
            None => Some(StoreBackend::Redis { url: url?, prefix }),
        },
        // A missing URL was reported above.
        StoreKind::Postgres => Some(StoreBackend::Postgres { url: url?, prefix }),
    }
}

/// A byte count as a `usize`, saturating (the same on 64-bit targets).
pub(crate) fn saturating_usize(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// Checks every `[upstreams.NAME]`; returns their endpoints, parsed, when
/// they all parse.
fn validate_upstreams(config: &Config, c: &mut Checker<'_>) -> Option<Vec<Vec<EndpointSpec>>> {
    let mut all = Some(Vec::new());
    for (name, upstream) in &config.upstreams {
        let name = name.as_str();
        if upstream.endpoints.get_ref().is_empty() {
            c.error(
                upstream.endpoints.span(),
                format!(
                    "upstream {name:?} has no endpoints; list at least one \"http://host:port\""
                ),
            );
        }
        let mut endpoints = Some(Vec::new());
        for endpoint in upstream.endpoints.get_ref() {
            match endpoint_authority(endpoint.get_ref()) {
                Ok(authority) => {
                    if let Some(list) = endpoints.as_mut() {
                        list.push(EndpointSpec {
                            url: endpoint.get_ref().clone(),
                            authority,
                        });
                    }
                }
                Err(message) => {
                    c.error(endpoint.span(), message);
                    endpoints = None;
                }
            }
        }
        all = all.zip(endpoints).map(|(mut all, endpoints)| {
            all.push(endpoints);
            all
        });
        for (key, message) in validate_upstream(
            name,
            upstream.breaker.as_ref(),
            upstream.health_check.as_ref(),
            upstream.retry.as_ref(),
        ) {
            let mut path = vec![Seg::Key("upstreams"), Seg::Key(name)];
            path.extend(key.iter().map(|k| Seg::Key(k)));
            c.error_at(&path, message);
        }
        c.above_zero(
            at!["upstreams", name, "connect_timeout"],
            &format!("upstreams.{name}.connect_timeout"),
            upstream.connect_timeout.0,
            "no connection could be made (the default is \"2s\")",
        );
        c.above_zero(
            at!["upstreams", name, "request_timeout"],
            &format!("upstreams.{name}.request_timeout"),
            upstream.request_timeout.0,
            "every request would time out (the default is \"30s\")",
        );
    }
    all
}

/// Checks every `[[routes]]`; returns what they name, parsed, when all of
/// it parses.
fn validate_routes(config: &Config, c: &mut Checker<'_>) -> Option<Vec<CheckedRoute>> {
    if config.routes.is_empty() {
        c.error(0..0, "no [[routes]]: add at least one route");
    }
    let mut checked = Some(Vec::new());
    let mut seen: Vec<(&str, Option<String>)> = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let prefix = route.path_prefix.get_ref();
        if !prefix.starts_with('/') {
            c.error(
                route.path_prefix.span(),
                format!("path_prefix {prefix:?} must start with \"/\""),
            );
        }
        if let Some(host) = &route.host {
            let bare = host
                .parse::<http::uri::Authority>()
                .ok()
                .filter(|a| a.port().is_none() && a.as_str() == a.host() && !a.host().is_empty());
            if bare.is_none() {
                c.error_at(
                    at!["routes", i, "host"],
                    format!(
                        "routes.host {host:?} is not a host name; write the name alone, without scheme, port or path, such as \"api.example.com\""
                    ),
                );
            }
        }
        let host = route.host.as_ref().map(|h| h.to_ascii_lowercase());
        if route.methods.is_none() && seen.iter().any(|(p, h)| *p == prefix && *h == host) {
            c.error(
                route.path_prefix.span(),
                format!("another route already has path_prefix {prefix:?} for the same host"),
            );
        }
        seen.push((prefix, host));
        let upstream = config
            .upstreams
            .keys()
            .position(|name| name == route.upstream.get_ref());
        if upstream.is_none() {
            let known: Vec<&str> = config.upstreams.keys().map(String::as_str).collect();
            c.error(
                route.upstream.span(),
                format!(
                    "unknown upstream {:?}; defined upstreams: [{}]",
                    route.upstream.get_ref(),
                    known.join(", ")
                ),
            );
        }
        let methods = route.methods.as_ref().map(|ms| check_methods(c, ms));
        let mut idempotency = None;
        if let Some(idem) = &route.idempotency {
            let methods = check_methods(c, &idem.methods);
            c.above_zero(
                at!["routes", i, "idempotency", "ttl"],
                "routes.idempotency.ttl",
                idem.ttl.0,
                "a result would be forgotten as soon as it is stored (the default is \"24h\")",
            );
            if let Some(lease) = &idem.lease {
                c.above_zero(
                    at!["routes", i, "idempotency", "lease"],
                    "routes.idempotency.lease",
                    lease.0,
                    "every claim would lapse at once; leave it out for the upstream's request_timeout plus a margin",
                );
            }
            let tenant = match HeaderName::from_bytes(idem.tenant_header.get_ref().as_bytes()) {
                Ok(tenant) => Some(tenant),
                Err(_) => {
                    c.error(
                        idem.tenant_header.span(),
                        format!(
                            "tenant_header {:?} is not a valid header name",
                            idem.tenant_header.get_ref()
                        ),
                    );
                    None
                }
            };
            idempotency = Some(methods.zip(tenant));
        }
        if let Some(stale) = route.stale.as_ref().filter(|s| s.enabled) {
            c.above_zero(
                at!["routes", i, "stale", "max_age"],
                "routes.stale.max_age",
                stale.max_age.0,
                "nothing kept could ever be served (the default is \"5m\")",
            );
            if stale.max_entry_size.0 > stale.max_bytes.0 {
                c.error_at(
                    at!["routes", i, "stale", "max_entry_size"],
                    "routes.stale.max_entry_size cannot be above routes.stale.max_bytes",
                );
            }
        }
        // Each `None` below stands for an error recorded above.
        let route = (|| {
            Some(CheckedRoute {
                upstream: upstream?,
                methods: match methods {
                    None => None,
                    Some(methods) => Some(methods?),
                },
                idempotency: match idempotency {
                    None => None,
                    Some(idempotency) => Some(idempotency?),
                },
            })
        })();
        checked = checked.zip(route).map(|(mut all, route)| {
            all.push(route);
            all
        });
    }
    checked
}

fn validate_drain(drain: &DrainConfig, c: &mut Checker<'_>) {
    if drain.batch_size == 0 {
        c.error_at(
            at!["drain", "batch_size"],
            "drain.batch_size must be at least 1",
        );
    }
    if !(drain.percent > 0.0 && drain.percent <= 100.0) {
        c.error_at(
            at!["drain", "percent"],
            "drain.percent must be above 0 and at most 100",
        );
    }
    c.above_zero(
        at!["drain", "deadline"],
        "drain.deadline",
        drain.deadline.0,
        "connections would be cut the moment the drain starts (the default is \"30s\")",
    );
    if !drain.deadline.0.is_zero() && drain.shutdown_delay.0 >= drain.deadline.0 {
        // Point at whichever of the two is written (the deadline when both).
        let key = if c.written(at!["drain", "deadline"]) {
            "deadline"
        } else {
            "shutdown_delay"
        };
        c.error_at(
            at!["drain", key],
            "drain.shutdown_delay must be shorter than drain.deadline (both count from the signal)",
        );
    }
    c.above_zero(
        at!["drain", "batch_interval"],
        "drain.batch_interval",
        drain.batch_interval.0,
        "write the time between two batches, such as \"2s\"",
    );
    c.above_zero(
        at!["drain", "gradual_over"],
        "drain.gradual_over",
        drain.gradual_over.0,
        "write the length of a gradual drain, such as \"20s\"",
    );
}
/// Checks the resilience keys of one upstream. Each error comes with the
/// path of its key within `[upstreams.NAME]` (such as `["breaker",
/// "failures"]`), so `keel check` can point at it; messages name the key.
fn validate_upstream(
    name: &str,
    breaker: Option<&BreakerConfig>,
    health: Option<&HealthCheckConfig>,
    retry: Option<&RetryConfig>,
) -> Vec<(&'static [&'static str], String)> {
    let mut errors: Vec<(&'static [&'static str], String)> = Vec::new();
    let mut above_zero = |key: &'static [&'static str], value: Duration| {
        if value.is_zero() {
            errors.push((
                key,
                format!("upstreams.{name}.{} must be above zero", key.join(".")),
            ));
        }
    };
    if let Some(b) = breaker {
        above_zero(&["breaker", "window"], b.window.0);
        above_zero(&["breaker", "open_duration"], b.open_duration.0);
        above_zero(&["breaker", "probe_timeout"], b.probe_timeout.0);
        if b.gradual_recovery {
            above_zero(&["breaker", "recovery_step"], b.recovery_step.0);
        }
    }
    if let Some(h) = health {
        above_zero(&["health_check", "interval"], h.interval.0);
        above_zero(&["health_check", "timeout"], h.timeout.0);
    }
    if let Some(b) = breaker {
        if b.failures == 0 {
            errors.push((
                &["breaker", "failures"],
                format!("upstreams.{name}.breaker.failures must be at least 1"),
            ));
        }
        if b.half_open_probes == 0 {
            errors.push((
                &["breaker", "half_open_probes"],
                format!("upstreams.{name}.breaker.half_open_probes must be at least 1"),
            ));
        }
        let rate_ok = |r: f64| r > 0.0 && r <= 1.0;
        if b.failure_rate.is_some_and(|r| !rate_ok(r)) {
            errors.push((
                &["breaker", "failure_rate"],
                format!(
                    "upstreams.{name}.breaker.failure_rate is a share: above 0 and at most 1 (0.5 is half the calls)"
                ),
            ));
        }
        if !rate_ok(b.upstream_failure_rate) {
            errors.push((
                &["breaker", "upstream_failure_rate"],
                format!(
                    "upstreams.{name}.breaker.upstream_failure_rate is a share: above 0 and at most 1 (0.5 is half the requests)"
                ),
            ));
        }
        if let Some(bad) = b
            .failure_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            errors.push((
                &["breaker", "failure_statuses"],
                format!(
                    "upstreams.{name}.breaker.failure_statuses: {bad} is not an HTTP status (100 to 599)"
                ),
            ));
        }
    }
    if let Some(h) = health {
        let path_ok = h.path.starts_with('/')
            && h.path.parse::<http::uri::PathAndQuery>().is_ok()
            && http::Request::get(h.path.as_str()).body(()).is_ok();
        if !path_ok {
            errors.push((
                &["health_check", "path"],
                format!(
                    "upstreams.{name}.health_check.path {:?} must be a request path starting with \"/\", such as \"/healthz\"",
                    h.path
                ),
            ));
        }
        if h.healthy_threshold == 0 {
            errors.push((
                &["health_check", "healthy_threshold"],
                format!("upstreams.{name}.health_check.healthy_threshold must be at least 1"),
            ));
        }
        if h.unhealthy_threshold == 0 {
            errors.push((
                &["health_check", "unhealthy_threshold"],
                format!("upstreams.{name}.health_check.unhealthy_threshold must be at least 1"),
            ));
        }
    }
    if let Some(r) = retry {
        if r.max_attempts == 0 {
            errors.push((
                &["retry", "max_attempts"],
                format!(
                    "upstreams.{name}.retry.max_attempts must be at least 1 (1 means no retries)"
                ),
            ));
        }
        if !(0.0..=10.0).contains(&r.budget_ratio) {
            errors.push((
                &["retry", "budget_ratio"],
                format!("upstreams.{name}.retry.budget_ratio must be between 0 and 10"),
            ));
        }
        if r.backoff_cap.0 < r.backoff_base.0 {
            errors.push((
                &["retry", "backoff_cap"],
                format!("upstreams.{name}.retry.backoff_cap must not be below backoff_base"),
            ));
        }
        if let Some(bad) = r.statuses.iter().find(|s| !(100..=599).contains(*s)) {
            errors.push((
                &["retry", "statuses"],
                format!(
                    "upstreams.{name}.retry.statuses: {bad} is not an HTTP status (100 to 599)"
                ),
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    #[test]
    fn load_balancing_prints_as_the_config_spells_it() {
        use serde::de::value::{Error, StrDeserializer};
        for lb in [
            crate::LoadBalancing::LeastOutstanding,
            crate::LoadBalancing::RoundRobin,
        ] {
            let parsed: crate::LoadBalancing =
                serde::Deserialize::deserialize(StrDeserializer::<Error>::new(lb.as_str()))
                    .expect("the config's own spelling");
            assert_eq!(parsed, lb);
        }
    }

    use super::*;
    use crate::{LoadBalancing, StoreBackend, parse};

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9901"

[store]
kind = "embedded"
path = "keel-data"

[upstreams.app]
endpoints = ["http://127.0.0.1:3000"]

[[routes]]
path_prefix = "/"
upstream = "app"

[routes.idempotency]
enabled = true
required = false
methods = ["POST", "PATCH"]
ttl = "24h"
tenant_header = "authorization"

[drain]
shutdown_delay = "5s"
batch_size = 10000
batch_interval = "2s"
deadline = "30s"
"#;

    #[test]
    fn durable_claims_is_an_embedded_store_setting() {
        let durable = |text: &str| match parse(Path::new("k.toml"), text).expect("valid") {
            crate::Spec {
                store:
                    crate::StoreSpec {
                        backend: StoreBackend::Embedded { durable_claims, .. },
                        ..
                    },
                ..
            } => durable_claims,
            other => panic!("an embedded store: {:?}", other.store),
        };
        assert!(durable(GOOD), "on by default");
        let text = GOOD.replace(
            "path = \"keel-data\"",
            "path = \"keel-data\"\ndurable_claims = false",
        );
        assert!(!durable(&text));

        let text = GOOD.replace(
            "kind = \"embedded\"\npath = \"keel-data\"",
            "kind = \"redis\"\nurl = \"redis://127.0.0.1/\"\ndurable_claims = false",
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("k.toml:9:18: store.durable_claims is only used by kind"),
            "{errs:?}"
        );
    }

    fn errors(text: &str) -> Vec<String> {
        match parse(Path::new("k.toml"), text) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn contract_example_parses() {
        let spec = parse(Path::new("k.toml"), GOOD).expect("valid");
        assert!(matches!(
            spec.store.backend,
            StoreBackend::Embedded { ref path, .. } if path == Path::new("keel-data")
        ));
        let idem = spec.routes[0].idempotency.as_ref().expect("idempotency");
        assert_eq!(idem.ttl, Duration::from_secs(86_400));
        assert_eq!(
            spec.drain.pace,
            crate::DrainPace::Batch {
                size: 10_000,
                interval: Duration::from_secs(2)
            }
        );
        assert_eq!(spec.upstreams[0].name, "app");
        assert_eq!(
            spec.upstreams[0].load_balancing,
            LoadBalancing::LeastOutstanding
        );
    }

    #[test]
    fn unknown_key_points_at_the_key() {
        let text = GOOD.replace("admin_listen", "admin_lsten");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("k.toml:4:1: unknown field `admin_lsten`"),
            "{errs:?}"
        );
    }

    #[test]
    fn unknown_upstream_points_at_the_value() {
        let text = GOOD.replace("upstream = \"app\"", "upstream = \"nope\"");
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("k.toml:15:12: unknown upstream \"nope\""),
            "{errs:?}"
        );
    }

    #[test]
    fn bad_duration_and_size() {
        let text = GOOD.replace("ttl = \"24h\"", "ttl = \"24 hours\"");
        let errs = errors(&text);
        assert!(errs[0].starts_with("k.toml:21:7:"), "{errs:?}");
        assert!(errs[0].contains("no spaces allowed"), "{errs:?}");
        let text = GOOD.replace("ttl = \"24h\"", "ttl = \"24hours\"");
        assert!(errors(&text)[0].contains("unknown unit"));
        let text = GOOD.replace(
            "admin_listen = \"127.0.0.1:9901\"",
            "max_body_size = \"ten\"",
        );
        let errs = errors(&text);
        assert!(errs[0].starts_with("k.toml:4:17:"), "{errs:?}");
    }

    #[test]
    fn semantic_checks() {
        let text = GOOD.replace("http://127.0.0.1:3000", "https://x:1");
        assert!(errors(&text)[0].contains("https upstreams are not supported"));
        let text = GOOD.replace("path_prefix = \"/\"", "path_prefix = \"api\"");
        assert!(errors(&text)[0].contains("must start with"));
        let text = GOOD.replace(
            "kind = \"embedded\"\npath = \"keel-data\"",
            "kind = \"redis\"",
        );
        assert!(errors(&text)[0].contains("needs url"));
        let text = GOOD.replace("\"POST\", \"PATCH\"", "\"post\"");
        assert!(errors(&text)[0].contains("not an HTTP method"));
        let text = GOOD.replace("127.0.0.1:8080", "localhost");
        assert!(errors(&text)[0].starts_with("k.toml:3:10: listen = \"localhost\""));
        let text = GOOD.replace("kind = \"embedded\"", "kind = \"sqlite\"");
        assert!(
            errors(&text)[0].starts_with("k.toml:7:8:"),
            "{:?}",
            errors(&text)
        );
        assert!(errors("[server\n").len() == 1);
    }

    /// One error, starting with `want` (`LINE:COL: message`).
    #[track_caller]
    fn assert_error(text: &str, want: &str) {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "{errs:?}\n---\n{text}");
        assert!(
            errs[0].starts_with(&format!("k.toml:{want}")),
            "want k.toml:{want}\ngot  {}\n---\n{text}",
            errs[0]
        );
    }

    #[test]
    fn errors_point_at_the_key_even_inside_nested_tables() {
        let drain = |extra: &str| GOOD.replace("deadline = \"30s\"", extra);
        assert_error(
            &drain("deadline = \"30s\"\nstrategy = \"percent\"\npercent = 0.0"),
            "30:11: drain.percent must be above 0",
        );
        assert_error(
            &drain("deadline = \"3s\""),
            "28:12: drain.shutdown_delay must be shorter than drain.deadline",
        );
        // Only shutdown_delay is written (deadline is the default 30s).
        assert_error(
            &GOOD
                .replace("deadline = \"30s\"", "")
                .replace("shutdown_delay = \"5s\"", "shutdown_delay = \"40s\""),
            "25:18: drain.shutdown_delay must be shorter",
        );
        assert_error(
            &GOOD.replace("batch_interval = \"2s\"", "batch_interval = \"0s\""),
            "27:18: drain.batch_interval must be above zero",
        );
        assert_error(
            &GOOD.replace("batch_size = 10000", "batch_size = 0"),
            "26:14: drain.batch_size must be at least 1",
        );
        assert_error(
            &GOOD.replace("ttl = \"24h\"", "ttl = \"0s\""),
            "21:7: routes.idempotency.ttl must be above zero",
        );
        // A dotted key at the top level points at its value too.
        let without_drain = &GOOD[..GOOD.find("[drain]").expect("drain")];
        assert_error(
            &format!("drain.percent = 101.0{without_drain}"),
            "1:17: drain.percent must be above 0",
        );
    }

    #[test]
    fn a_key_left_out_points_at_its_table() {
        let checker_errors = |text: &str, path: &[Seg<'_>]| {
            let doc = DeTable::parse(text).expect("toml");
            let c = Checker {
                file: Path::new("k.toml"),
                source: text,
                doc: doc.get_ref(),
                errors: Vec::new(),
            };
            line_col(text, c.span(path).start)
        };
        let text = "[server]\nlisten = \"x\"\n\n[[routes]]\na = 1\n[[routes]]\nb = 2\n";
        assert_eq!(checker_errors(text, at!["server", "listen"]), (2, 10));
        assert_eq!(checker_errors(text, at!["routes", 1, "b"]), (7, 5));
        // Absent key: its table (the header of the second [[routes]]).
        let (line, _) = checker_errors(text, at!["routes", 1, "idempotency", "ttl"]);
        assert!(line == 6 || line == 7, "{line}");
        assert_eq!(checker_errors(text, at!["drain", "percent"]), (1, 1));
    }

    #[test]
    fn store_urls_are_parsed_as_the_stores_parse_them() {
        let store = |body: &str| {
            GOOD.replace(
                "kind = \"embedded\"\npath = \"keel-data\"",
                &format!("kind = {body}"),
            )
        };
        assert_error(
            &store("\"redis\"\nurl = \"redis://:pw@[::1\""),
            "8:7: store.url is not a Redis URL the store can open (Redis URL did not parse); write \"redis://",
        );
        assert!(
            errors(&store("\"redis\"\nurl = \"redis://:pw@[::1\""))[0].contains("write \"redis://")
        );
        assert!(!errors(&store("\"redis\"\nurl = \"redis://:pw@[::1\""))[0].contains("pw"));
        assert_error(
            &store("\"redis\"\nurl = \"rediss://h:6379/\""),
            "8:7: store.url uses TLS (rediss://), which this build does not support",
        );
        assert_error(
            &store("\"redis\"\nurl = \"redis://h:6379/\"\nprefix = \"a{b\""),
            "9:10: store.prefix \"a{b\" cannot prefix Redis keys",
        );
        assert!(errors(&store("\"redis\"\nurl = \"redis://h:6379/2\"")).is_empty());
        assert_error(
            &store("\"postgres\"\nurl = \"postgres://u@h:notaport/db\""),
            "8:7: store.url is not a PostgreSQL URL the store can open (invalid connection string: invalid value for option `port`)",
        );
        assert_error(
            &store("\"postgres\"\nurl = \"postgres:///db\""),
            "8:7: store.url is not a PostgreSQL URL the store can open (it names no host)",
        );
        assert!(errors(&store("\"postgres\"\nurl = \"postgresql://u:p@h1,h2/db\"")).is_empty());
        assert_error(
            &store("\"redis\"\ncluster_nodes = [\"redis://:p@a:1/\", \"redis://:q@b:2/\"]"),
            "8:17: store.cluster_nodes do not make one cluster client (Cannot use different password among initial nodes.); give every node",
        );
        assert_error(
            &store("\"redis\"\nurl = \"redis://h/\"\ntimeout = \"0s\""),
            "9:11: store.timeout must be above zero",
        );
        assert_error(
            &GOOD.replace("path = \"keel-data\"", "path = \"\""),
            "8:8: store.path is empty",
        );
        assert_error(
            &store("\"memory\"\npath = \"x\""),
            "8:8: store.path is only used by kind = \"embedded\"",
        );
    }

    #[test]
    fn listeners_must_not_share_a_socket() {
        let pair = |listen: &str, admin: &str| {
            GOOD.replace("127.0.0.1:8080", listen)
                .replace("127.0.0.1:9901", admin)
        };
        for (listen, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("[::]:8080", "127.0.0.1:8080"),
            ("[::1]:8080", "[::]:8080"),
            ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080"),
        ] {
            assert_error(
                &pair(listen, admin),
                &format!(
                    "4:16: admin_listen \"{admin}\" takes the same port as listen \"{listen}\""
                ),
            );
        }
        for (listen, admin) in [
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("0.0.0.0:8080", "[::1]:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
            ("0.0.0.0:8080", "0.0.0.0:8081"),
        ] {
            assert!(errors(&pair(listen, admin)).is_empty(), "{listen} {admin}");
        }
    }

    #[test]
    fn resilience_errors_point_at_their_key() {
        let with = |table: &str| {
            GOOD.replace(
                "endpoints = [\"http://127.0.0.1:3000\"]",
                &format!("endpoints = [\"http://127.0.0.1:3000\"]\n{table}"),
            )
        };
        assert_error(
            &with("[upstreams.app.breaker]\nfailures = 0"),
            "13:12: upstreams.app.breaker.failures must be at least 1",
        );
        assert_error(
            &with("[upstreams.app.breaker]\nwindow = \"0s\""),
            "13:10: upstreams.app.breaker.window must be above zero",
        );
        assert_error(
            &with("[upstreams.app.breaker]\nprobe_timeout = \"0s\""),
            "13:17: upstreams.app.breaker.probe_timeout must be above zero",
        );
        assert_error(
            &with("[upstreams.app.health_check]\npath = \"/a b\""),
            "13:8: upstreams.app.health_check.path \"/a b\" must be a request path",
        );
        assert_error(
            &with("[upstreams.app.retry]\nstatuses = [503, 1000]"),
            "13:12: upstreams.app.retry.statuses: 1000 is not an HTTP status",
        );
        assert_error(
            &with("connect_timeout = \"0s\""),
            "12:19: upstreams.app.connect_timeout must be above zero",
        );
    }

    #[test]
    fn routes_checks() {
        assert_error(
            &GOOD.replace(
                "path_prefix = \"/\"",
                "path_prefix = \"/\"\nhost = \"a.example:80\"",
            ),
            "15:8: routes.host \"a.example:80\" is not a host name",
        );
        assert!(
            errors(&GOOD.replace(
                "path_prefix = \"/\"",
                "path_prefix = \"/\"\nhost = \"A.example\""
            ))
            .is_empty()
        );
        assert_error(
            &GOOD.replace("ttl = \"24h\"", "ttl = \"24h\"\nlease = \"0s\""),
            "22:9: routes.idempotency.lease must be above zero",
        );
        assert_error(
            &GOOD.replace("\"POST\", \"PATCH\"", "\"POST\", \"POTS\""),
            "20:20: \"POTS\" is not an HTTP method; use one of GET, HEAD, POST",
        );
        assert_error(
            &format!("{GOOD}\n[routes.stale]\nmax_age = \"0s\""),
            "31:11: routes.stale.max_age must be above zero",
        );
    }

    #[test]
    fn server_limits() {
        let server = |line: &str| {
            GOOD.replace(
                "admin_listen = \"127.0.0.1:9901\"",
                &format!("admin_listen = \"127.0.0.1:9901\"\n{line}"),
            )
        };
        assert_error(
            &server("workers = 100000000"),
            "5:11: server.workers = 100000000 is too many; use at most 1024",
        );
        assert!(errors(&server("workers = 1024")).is_empty());
        assert_error(
            &server("idle_timeout = \"0s\""),
            "5:16: server.idle_timeout must be above zero",
        );
        assert_error(
            &server("max_header_size = \"0B\""),
            "5:19: server.max_header_size must be between 1KiB and 1MiB",
        );
        assert_error(
            &server("max_header_size = \"2MiB\""),
            "5:19: server.max_header_size must be between 1KiB and 1MiB",
        );
        assert_error(
            &GOOD.replace("[drain]", "[log]\nlevel = \"keel=loud\"\n[drain]"),
            "25:9: log.level \"keel=loud\" is not a log filter",
        );
    }

    #[test]
    fn server_timeouts_have_defaults_and_must_be_above_zero() {
        let spec = parse(Path::new("k.toml"), GOOD).expect("valid");
        let server = &spec.server;
        assert_eq!(server.idle_timeout, Duration::from_secs(60));
        assert_eq!(server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(server.http2_keep_alive_interval, Duration::from_secs(30));
        assert_eq!(server.http2_keep_alive_timeout, Duration::from_secs(15));
        assert_eq!(server.admin_max_connections, 64);

        let text = GOOD.replace(
            "admin_listen = \"127.0.0.1:9901\"",
            "admin_listen = \"127.0.0.1:9901\"\nheader_read_timeout = \"2s\"\nhttp2_keep_alive_interval = \"5s\"\nhttp2_keep_alive_timeout = \"3s\"\nadmin_max_connections = 8",
        );
        let spec = parse(Path::new("k.toml"), &text).expect("valid");
        assert_eq!(spec.server.header_read_timeout, Duration::from_secs(2));
        assert_eq!(spec.server.admin_max_connections, 8);

        for key in [
            "idle_timeout",
            "header_read_timeout",
            "http2_keep_alive_interval",
            "http2_keep_alive_timeout",
        ] {
            let text = GOOD.replace(
                "admin_listen = \"127.0.0.1:9901\"",
                &format!("admin_listen = \"127.0.0.1:9901\"\n{key} = \"0s\""),
            );
            let errs = errors(&text);
            assert_eq!(errs.len(), 1, "{errs:?}");
            let at = format!(
                "k.toml:5:{}: server.{key} must be above zero",
                key.len() + 4
            );
            assert!(errs[0].starts_with(&at), "{errs:?}");
        }
        let text = GOOD.replace(
            "admin_listen = \"127.0.0.1:9901\"",
            "admin_listen = \"127.0.0.1:9901\"\nadmin_max_connections = 0",
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("k.toml:5:25: server.admin_max_connections must be at least 1"),
            "{errs:?}"
        );
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncdé f", 8), (2, 5));
        assert_eq!(line_col("", 10), (1, 1));
    }

    /// The parser never panics, and what it accepts is within the bounds
    /// `serve` needs: thousands of random and mutated documents on stable
    /// (the `fuzz/` target does the same with coverage guidance).
    mod no_panic {
        use super::*;
        use proptest::prelude::*;

        const SEEDS: [&str; 4] = [
            GOOD,
            include_str!("../../../examples/keel-embedded.toml"),
            include_str!("../../../examples/keel-redis.toml"),
            include_str!("../../../examples/keel-postgres.toml"),
        ];

        /// Pieces of TOML and of bad values to splice in.
        const SNIPPETS: &[&str] = &[
            "\n",
            " ",
            "=",
            "\"",
            "'",
            "[",
            "]",
            "{",
            "}",
            ",",
            ".",
            "#",
            "\\",
            "é",
            "\u{0}",
            "\r\n",
            "'''",
            "\"\"\"",
            "[[routes]]\n",
            "[drain]\n",
            "[store]\n",
            "[server]\n",
            "[log]\n",
            "[upstreams.app]\n",
            "[upstreams.app.breaker]\n",
            "[upstreams.app.retry]\n",
            "[upstreams.app.health_check]\n",
            "[routes.idempotency]\n",
            "[routes.stale]\n",
            "0",
            "-1",
            "1.5",
            "nan",
            "-inf",
            "1e400",
            "99999999999999999999",
            "true",
            "1979-05-27T07:32:00Z",
            "\"0s\"",
            "\"30 s\"",
            "\"365d\"",
            "\"366d\"",
            "\"0B\"",
            "\"1GiB\"",
            "\"POTS\"",
            "\"get\"",
            "\"redis://:pw@[::1\"",
            "\"postgres:///db\"",
            "\"127.0.0.1:8080\"",
            "\"0.0.0.0:8080\"",
            "\"[::]:9901\"",
            "kind = \"redis\"\n",
            "kind = \"postgres\"\n",
            "kind = \"memory\"\n",
            "url = ",
            "cluster_nodes = [\"redis://a:1/\"]\n",
            "workers = ",
            "percent = ",
            "deadline = ",
            "ttl = ",
            "lease = ",
            "methods = ",
            "host = ",
            "level = ",
            "prefix = ",
            "path = ",
            "failures = ",
            "statuses = ",
            "max_header_size = ",
            "admin_listen = ",
            "enabled = true\n",
            "[]",
            "[\"\"]",
        ];

        fn boundary(text: &str, at: usize) -> usize {
            let mut at = at % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            at
        }

        /// `seed` with `edits` (position, length, snippet, kind) applied.
        fn mutate(seed: &str, edits: &[(usize, usize, usize, u8)]) -> String {
            let mut text = seed.to_owned();
            for &(pos, len, snippet, kind) in edits {
                let start = boundary(&text, pos);
                let end = boundary(&text, start + len % 24).max(start);
                let snippet = SNIPPETS[snippet % SNIPPETS.len()];
                match kind % 3 {
                    0 => text.replace_range(start..end, ""),
                    1 => text.insert_str(start, snippet),
                    _ => text.replace_range(start..end, snippet),
                }
            }
            text
        }

        /// Parses `text`; checks the errors' places and, when accepted, the
        /// bounds `serve` relies on.
        fn check(text: &str) {
            match parse(Path::new("f.toml"), text) {
                Err(errors) => {
                    assert!(!errors.is_empty());
                    let lines = text.split('\n').count();
                    for e in &errors {
                        assert!(e.line >= 1 && e.line <= lines && e.col >= 1, "{e}");
                        assert!(!e.message.is_empty());
                    }
                }
                Ok(spec) => {
                    assert!(spec.server.workers <= MAX_WORKERS);
                    assert!(!spec.server.idle_timeout.is_zero());
                    assert!(HEADER_SIZE_RANGE.contains(&(spec.server.max_header_size as u64)));
                    assert!(!spec.store.timeout.is_zero());
                    assert!(!spec.routes.is_empty());
                    assert!(spec.drain.shutdown_delay < spec.drain.deadline);
                    if let Some(admin) = spec.server.admin_listen {
                        assert!(!addrs_overlap(admin, spec.server.listen));
                    }
                    for upstream in &spec.upstreams {
                        assert!(!upstream.endpoints.is_empty());
                        assert!(!upstream.request_timeout.is_zero());
                        assert!(!upstream.connect_timeout.is_zero());
                    }
                    for route in &spec.routes {
                        assert!(route.upstream < spec.upstreams.len());
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn mutated_configs(
                seed in 0..SEEDS.len(),
                edits in prop::collection::vec(
                    (any::<usize>(), any::<usize>(), any::<usize>(), any::<u8>()),
                    1..6,
                ),
            ) {
                check(&mutate(SEEDS[seed], &edits));
            }

            #[test]
            fn arbitrary_text(text in any::<String>()) {
                check(&text);
            }

            #[test]
            fn spliced_snippets(pieces in prop::collection::vec(0..SNIPPETS.len(), 0..40)) {
                let text: String = pieces.iter().map(|&i| SNIPPETS[i]).collect();
                check(&text);
            }
        }
    }
}
