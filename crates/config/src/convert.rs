//! From the checked schema to the [`Spec`]: defaults filled in, units
//! unwrapped, each store kind with its own fields, routes pointing at
//! their upstream by index. Nothing here can fail: whatever could (an
//! address, a URL, a method, a header name, an upstream's name) was
//! parsed by the checks and arrives in [`Checked`].

use crate::check::{Checked, CheckedRoute};
use crate::schema::{
    BreakerConfig, Config, DrainConfig, DrainStrategy, HealthCheckConfig, IdempotencyConfig,
    LogConfig, RetryConfig, RouteConfig, ServerConfig, StaleConfig, StoreConfig, StoreKind,
    UpstreamConfig,
};
use crate::spec::{
    BreakerSpec, DrainPace, DrainSpec, EndpointSpec, HealthCheckSpec, IdempotencySpec, LogSpec,
    RetrySpec, RouteSpec, ServerSpec, Spec, StaleSpec, StoreBackend, StoreSpec, UpstreamSpec,
};

/// The spec of a config whose checks all passed.
pub(crate) fn spec(config: Config, checked: Checked) -> Spec {
    let Checked {
        listen,
        admin_listen,
        endpoints,
        routes,
    } = checked;
    let upstreams = config
        .upstreams
        .iter()
        .zip(endpoints)
        .map(|((name, upstream), endpoints)| upstream_spec(name, upstream, endpoints))
        .collect();
    let routes = config
        .routes
        .iter()
        .zip(routes)
        .map(|(route, checked)| route_spec(route, checked, &config.server))
        .collect();
    Spec {
        server: server_spec(&config.server, listen, admin_listen),
        store: store_spec(&config.store),
        upstreams,
        routes,
        drain: drain_spec(&config.drain),
        log: log_spec(config.log),
    }
}

/// A size as a `usize`, saturating (the same on 64-bit targets).
fn size(bytes: u64) -> usize {
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

fn server_spec(
    server: &ServerConfig,
    listen: std::net::SocketAddr,
    admin_listen: Option<std::net::SocketAddr>,
) -> ServerSpec {
    ServerSpec {
        listen,
        admin_listen,
        idle_timeout: server.idle_timeout.get_ref().0,
        header_read_timeout: server.header_read_timeout.get_ref().0,
        http2_keep_alive_interval: server.http2_keep_alive_interval.get_ref().0,
        http2_keep_alive_timeout: server.http2_keep_alive_timeout.get_ref().0,
        admin_max_connections: *server.admin_max_connections.get_ref(),
        max_header_size: size(server.max_header_size.0),
        max_body_size: server.max_body_size.0,
        via: server.via,
        workers: server.workers,
        buffer_budget: server.buffer_budget.get_ref().0,
    }
}

fn store_spec(store: &StoreConfig) -> StoreSpec {
    let url = || {
        store
            .url
            .as_ref()
            .map(|u| u.get_ref().clone())
            .unwrap_or_default()
    };
    let backend = match *store.kind.get_ref() {
        StoreKind::Memory => StoreBackend::Memory {
            max_bytes: size(store.max_bytes.get_ref().0),
            max_bytes_per_tenant: size(store.max_bytes_per_tenant.get_ref().0),
        },
        StoreKind::Embedded => StoreBackend::Embedded {
            path: store.embedded_path(),
            durable_claims: store.durable_claims(),
        },
        // The checks make sure a Redis store has `url` or nodes, not both.
        StoreKind::Redis => match &store.cluster_nodes {
            Some(nodes) => StoreBackend::RedisCluster {
                nodes: nodes
                    .get_ref()
                    .iter()
                    .map(|n| n.get_ref().clone())
                    .collect(),
                prefix: store.prefix.clone(),
            },
            None => StoreBackend::Redis {
                url: url(),
                prefix: store.prefix.clone(),
            },
        },
        StoreKind::Postgres => StoreBackend::Postgres {
            url: url(),
            prefix: store.prefix.clone(),
        },
    };
    StoreSpec {
        backend,
        timeout: store.timeout.0,
    }
}

fn upstream_spec(
    name: &str,
    upstream: &UpstreamConfig,
    endpoints: Vec<EndpointSpec>,
) -> UpstreamSpec {
    UpstreamSpec {
        name: name.to_owned(),
        endpoints,
        load_balancing: upstream.load_balancing,
        connect_timeout: upstream.connect_timeout.0,
        request_timeout: upstream.request_timeout.0,
        idle_timeout: upstream.idle_timeout.0,
        max_idle_per_endpoint: upstream.max_idle_per_endpoint,
        breaker: breaker_spec(
            upstream
                .breaker
                .as_ref()
                .unwrap_or(&BreakerConfig::default()),
        ),
        retry: retry_spec(upstream.retry.as_ref().unwrap_or(&RetryConfig::default())),
        health_check: upstream.health_check.as_ref().map(health_check_spec),
    }
}

fn breaker_spec(b: &BreakerConfig) -> BreakerSpec {
    BreakerSpec {
        enabled: b.enabled,
        failures: b.failures,
        window: b.window.0,
        failure_rate: b.failure_rate,
        min_calls: b.min_calls,
        upstream_failure_rate: b.upstream_failure_rate,
        open_duration: b.open_duration.0,
        max_open_duration: b.max_open_duration.0,
        half_open_probes: b.half_open_probes,
        probe_timeout: b.probe_timeout.0,
        recovery_step: b.gradual_recovery.then_some(b.recovery_step.0),
        failure_statuses: b.failure_statuses.clone(),
        max_retry_after: b.max_retry_after.0,
    }
}

fn retry_spec(r: &RetryConfig) -> RetrySpec {
    RetrySpec {
        enabled: r.enabled,
        max_attempts: r.max_attempts,
        statuses: r.statuses.clone(),
        backoff_base: r.backoff_base.0,
        backoff_cap: r.backoff_cap.0,
        budget_ratio: r.budget_ratio,
        budget_min_per_second: r.budget_min_per_second,
        max_body: r.max_body.0,
    }
}

fn health_check_spec(h: &HealthCheckConfig) -> HealthCheckSpec {
    HealthCheckSpec {
        path: h.path.clone(),
        interval: h.interval.0,
        timeout: h.timeout.0,
        healthy_threshold: h.healthy_threshold,
        unhealthy_threshold: h.unhealthy_threshold,
    }
}

fn route_spec(route: &RouteConfig, checked: CheckedRoute, server: &ServerConfig) -> RouteSpec {
    let path_prefix = route.path_prefix.get_ref().clone();
    let idempotency = route
        .idempotency
        .as_ref()
        .filter(|i| i.enabled)
        .zip(checked.idempotency)
        .map(|(idem, (methods, tenant_header))| idempotency_spec(idem, methods, tenant_header));
    RouteSpec {
        name: route.name.clone().unwrap_or_else(|| path_prefix.clone()),
        path_prefix,
        host: route.host.as_ref().map(|h| h.to_ascii_lowercase()),
        methods: checked.methods,
        upstream: checked.upstream,
        max_body_size: route.max_body_size.unwrap_or(server.max_body_size).0,
        idempotency,
        stale: route.stale.as_ref().filter(|s| s.enabled).map(stale_spec),
    }
}

fn idempotency_spec(
    idem: &IdempotencyConfig,
    methods: Vec<http::Method>,
    tenant_header: http::HeaderName,
) -> IdempotencySpec {
    IdempotencySpec {
        required: idem.required,
        methods,
        ttl: idem.ttl.0,
        tenant_header,
        missing_tenant: idem.missing_tenant,
        fail_open: idem.fail_open,
        lease: idem.lease.map(|l| l.0),
        max_body: size(idem.max_body.0),
        max_response: size(idem.max_response.0),
        server_errors: idem.server_errors,
        lapsed_lease: idem.lapsed_lease,
    }
}

fn stale_spec(s: &StaleConfig) -> StaleSpec {
    StaleSpec {
        max_age: s.max_age.0,
        max_bytes: s.max_bytes.0,
        max_entry_size: s.max_entry_size.0,
    }
}

fn drain_spec(d: &DrainConfig) -> DrainSpec {
    let pace = match d.strategy {
        DrainStrategy::Batch => DrainPace::Batch {
            size: size(d.batch_size),
            interval: d.batch_interval.0,
        },
        DrainStrategy::Percent => DrainPace::Percent {
            percent: d.percent,
            interval: d.batch_interval.0,
        },
        DrainStrategy::Gradual => DrainPace::Gradual {
            over: d.gradual_over.0,
        },
    };
    DrainSpec {
        shutdown_delay: d.shutdown_delay.0,
        deadline: d.deadline.0,
        pace,
        jitter: d.jitter,
        reconnect_window: d.reconnect_window.0,
        close_grace: d.close_grace.0,
        close_message_limit: d.close_message_limit.0,
    }
}

fn log_spec(log: LogConfig) -> LogSpec {
    LogSpec {
        level: log.level,
        format: log.format,
        access_log: log.access_log,
    }
}

/// The defaults an absent `[upstreams.NAME.breaker]` stands for.
impl Default for BreakerSpec {
    fn default() -> Self {
        breaker_spec(&BreakerConfig::default())
    }
}

/// The defaults an absent `[upstreams.NAME.retry]` stands for.
impl Default for RetrySpec {
    fn default() -> Self {
        retry_spec(&RetryConfig::default())
    }
}

/// The defaults an absent `[drain]` stands for.
impl Default for DrainSpec {
    fn default() -> Self {
        drain_spec(&DrainConfig::default())
    }
}

/// The defaults an absent `[store]` stands for: the memory store.
impl Default for StoreSpec {
    fn default() -> Self {
        store_spec(&StoreConfig::default())
    }
}
