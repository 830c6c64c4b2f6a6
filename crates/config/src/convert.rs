//! From the checked schema to the [`Spec`]: defaults filled in, units
//! unwrapped, each store kind with its own fields, routes pointing at
//! their upstream by index. Nothing here can fail: whatever could (an
//! address, a URL, a method, a header name, an upstream's name, what a
//! store kind needs) was parsed by the checks and arrives in [`Checked`].

use crate::check::{Checked, CheckedRoute, saturating_usize};
use crate::schema::{
    BreakerConfig, Config, DrainConfig, DrainStrategy, HealthCheckConfig, IdempotencyConfig,
    LogConfig, RetryConfig, RouteConfig, ServerConfig, StaleConfig, StoreConfig, UpstreamConfig,
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
        store,
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
        store: StoreSpec {
            backend: store,
            timeout: config.store.timeout.0,
        },
        upstreams,
        routes,
        drain: drain_spec(&config.drain),
        log: log_spec(config.log),
    }
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
        max_header_size: saturating_usize(server.max_header_size.0),
        max_body_size: server.max_body_size.0,
        via: server.via,
        workers: server.workers,
        buffer_budget: server.buffer_budget.get_ref().0,
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
        max_body: saturating_usize(idem.max_body.0),
        max_response: saturating_usize(idem.max_response.0),
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
            size: saturating_usize(d.batch_size),
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
        let store = StoreConfig::default();
        StoreSpec {
            backend: StoreBackend::Memory {
                max_bytes: saturating_usize(store.max_bytes.get_ref().0),
                max_bytes_per_tenant: saturating_usize(store.max_bytes_per_tenant.get_ref().0),
            },
            timeout: store.timeout.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use http::{HeaderName, Method};

    use crate::spec::*;

    fn spec(text: &str) -> Spec {
        match crate::parse(Path::new("k.toml"), text) {
            Ok(spec) => spec,
            Err(errors) => panic!("{errors:?}"),
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("an address")
    }

    const FULL: &str = r#"
[server]
listen = "0.0.0.0:8080"
admin_listen = "127.0.0.1:9901"
idle_timeout = "90s"
header_read_timeout = "3s"
http2_keep_alive_interval = "20s"
http2_keep_alive_timeout = "5s"
admin_max_connections = 8
max_header_size = "32KiB"
max_body_size = "2MiB"
via = true
workers = 4
buffer_budget = "64MiB"

[store]
kind = "redis"
cluster_nodes = ["redis://a:7000/", "redis://b:7001/"]
prefix = "tenant1"
timeout = "500ms"

[upstreams.zeta]
endpoints = ["http://127.0.0.1:3001"]

[upstreams.alpha]
endpoints = ["http://127.0.0.1:3000", "http://localhost:3002/"]
load_balancing = "round_robin"
connect_timeout = "250ms"
request_timeout = "5s"
idle_timeout = "30s"
max_idle_per_endpoint = 16

[upstreams.alpha.breaker]
failures = 7
window = "20s"
failure_rate = 0.25
gradual_recovery = false
failure_statuses = [500, 503]
max_retry_after = "1m"

[upstreams.alpha.retry]
max_attempts = 2
statuses = [503]
backoff_base = "10ms"
backoff_cap = "100ms"
max_body = "8KiB"

[upstreams.alpha.health_check]
path = "/ready"
interval = "2s"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 4

[[routes]]
name = "payments"
path_prefix = "/pay"
host = "API.Example.com"
methods = ["POST", "GET"]
upstream = "zeta"
max_body_size = "1MiB"

[routes.idempotency]
enabled = true
required = true
methods = ["POST", "PUT"]
ttl = "1h"
tenant_header = "X-Tenant"
missing_tenant = "reject"
fail_open = true
lease = "45s"
max_body = "512KiB"
max_response = "2MiB"
server_errors = "release"
lapsed_lease = "rerun"

[[routes]]
path_prefix = "/"
upstream = "alpha"

[routes.stale]
max_age = "2m"
max_bytes = "1MiB"
max_entry_size = "64KiB"

[drain]
shutdown_delay = "2s"
deadline = "40s"
strategy = "percent"
percent = 10.0
batch_interval = "3s"
jitter = false
reconnect_window = "0s"
close_grace = "2s"
close_message_limit = "1MiB"

[log]
level = "keel=debug,info"
format = "json"
access_log = false
"#;

    #[test]
    fn a_full_config_converts_to_typed_values() {
        let spec = spec(FULL);
        assert_eq!(
            spec.server,
            ServerSpec {
                listen: addr("0.0.0.0:8080"),
                admin_listen: Some(addr("127.0.0.1:9901")),
                idle_timeout: Duration::from_secs(90),
                header_read_timeout: Duration::from_secs(3),
                http2_keep_alive_interval: Duration::from_secs(20),
                http2_keep_alive_timeout: Duration::from_secs(5),
                admin_max_connections: 8,
                max_header_size: 32 * 1024,
                max_body_size: 2 << 20,
                via: true,
                workers: 4,
                buffer_budget: 64 << 20,
            }
        );
        assert_eq!(
            spec.store,
            StoreSpec {
                backend: StoreBackend::RedisCluster {
                    nodes: vec!["redis://a:7000/".into(), "redis://b:7001/".into()],
                    prefix: "tenant1".into(),
                },
                timeout: Duration::from_millis(500),
            }
        );

        // Upstreams by name; routes point at them by index.
        let names: Vec<&str> = spec.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert_eq!(spec.routes[0].upstream, 1);
        assert_eq!(spec.routes[1].upstream, 0);
        assert_eq!(spec.upstream_of(&spec.routes[0]).name, "zeta");

        let alpha = &spec.upstreams[0];
        assert_eq!(
            alpha.endpoints,
            [
                EndpointSpec {
                    url: "http://127.0.0.1:3000".into(),
                    authority: "127.0.0.1:3000".parse().expect("authority"),
                },
                EndpointSpec {
                    url: "http://localhost:3002/".into(),
                    authority: "localhost:3002".parse().expect("authority"),
                },
            ]
        );
        assert_eq!(alpha.load_balancing, LoadBalancing::RoundRobin);
        assert_eq!(alpha.connect_timeout, Duration::from_millis(250));
        assert_eq!(alpha.request_timeout, Duration::from_secs(5));
        assert_eq!(alpha.idle_timeout, Duration::from_secs(30));
        assert_eq!(alpha.max_idle_per_endpoint, 16);
        assert_eq!(
            alpha.breaker,
            BreakerSpec {
                failures: 7,
                window: Duration::from_secs(20),
                failure_rate: Some(0.25),
                recovery_step: None,
                failure_statuses: vec![500, 503],
                max_retry_after: Duration::from_secs(60),
                ..BreakerSpec::default()
            }
        );
        assert_eq!(
            alpha.retry,
            RetrySpec {
                max_attempts: 2,
                statuses: vec![503],
                backoff_base: Duration::from_millis(10),
                backoff_cap: Duration::from_millis(100),
                max_body: 8 * 1024,
                ..RetrySpec::default()
            }
        );
        assert_eq!(
            alpha.health_check,
            Some(HealthCheckSpec {
                path: "/ready".into(),
                interval: Duration::from_secs(2),
                timeout: Duration::from_millis(500),
                healthy_threshold: 1,
                unhealthy_threshold: 4,
            })
        );
        assert_eq!(spec.upstreams[1].health_check, None);

        let pay = &spec.routes[0];
        assert_eq!(pay.name, "payments");
        assert_eq!(pay.path_prefix, "/pay");
        assert_eq!(pay.host.as_deref(), Some("api.example.com"));
        assert_eq!(pay.methods, Some(vec![Method::POST, Method::GET]));
        assert_eq!(pay.max_body_size, 1 << 20);
        assert_eq!(pay.stale, None);
        assert_eq!(
            pay.idempotency,
            Some(IdempotencySpec {
                required: true,
                methods: vec![Method::POST, Method::PUT],
                ttl: Duration::from_secs(3600),
                tenant_header: HeaderName::from_static("x-tenant"),
                missing_tenant: MissingTenantPolicy::Reject,
                fail_open: true,
                lease: Some(Duration::from_secs(45)),
                max_body: 512 * 1024,
                max_response: 2 << 20,
                server_errors: ServerErrorsPolicy::Release,
                lapsed_lease: LapsedLeasePolicy::Rerun,
            })
        );
        let root = &spec.routes[1];
        assert_eq!(root.name, "/", "a route is named by its prefix by default");
        assert_eq!(root.host, None);
        assert_eq!(root.methods, None);
        assert_eq!(root.max_body_size, 2 << 20, "server.max_body_size");
        assert_eq!(root.idempotency, None);
        assert_eq!(
            root.stale,
            Some(StaleSpec {
                max_age: Duration::from_secs(120),
                max_bytes: 1 << 20,
                max_entry_size: 64 * 1024,
            })
        );
        assert!(spec.has_idempotent_routes());

        assert_eq!(
            spec.drain,
            DrainSpec {
                shutdown_delay: Duration::from_secs(2),
                deadline: Duration::from_secs(40),
                pace: DrainPace::Percent {
                    percent: 10.0,
                    interval: Duration::from_secs(3),
                },
                jitter: false,
                reconnect_window: Duration::ZERO,
                close_grace: Duration::from_secs(2),
                close_message_limit: 1 << 20,
            }
        );
        assert_eq!(
            spec.log,
            LogSpec {
                level: "keel=debug,info".into(),
                format: LogFormat::Json,
                access_log: false,
            }
        );
    }

    const MINIMAL: &str = "[server]\nlisten = \"[::1]:0\"\n\
        [upstreams.app]\nendpoints = [\"http://10.0.0.1:80\"]\n\
        [[routes]]\npath_prefix = \"/api\"\nupstream = \"app\"\n";

    #[test]
    fn absent_keys_arrive_as_their_defaults() {
        let spec = spec(MINIMAL);
        assert_eq!(spec.server.listen, addr("[::1]:0"));
        assert_eq!(spec.server.admin_listen, None);
        assert_eq!(spec.server.max_header_size, 16 * 1024);
        assert_eq!(spec.server.max_body_size, 10 << 20);
        assert_eq!(spec.server.buffer_budget, 256 << 20);
        assert_eq!(spec.server.workers, 0);
        assert_eq!(spec.store, StoreSpec::default());
        assert_eq!(
            spec.store.backend,
            StoreBackend::Memory {
                max_bytes: 256 << 20,
                max_bytes_per_tenant: 64 << 20,
            }
        );
        assert_eq!(spec.store.timeout, Duration::from_secs(2));

        let app = &spec.upstreams[0];
        assert_eq!(app.load_balancing, LoadBalancing::LeastOutstanding);
        assert_eq!(app.connect_timeout, Duration::from_secs(2));
        assert_eq!(app.request_timeout, Duration::from_secs(30));
        assert_eq!(app.max_idle_per_endpoint, 256);
        assert!(app.breaker.enabled && app.retry.enabled);
        assert_eq!(app.breaker, BreakerSpec::default());
        assert_eq!(app.breaker.failures, 5);
        assert_eq!(app.breaker.recovery_step, Some(Duration::from_secs(5)));
        assert_eq!(app.breaker.failure_statuses, [502, 503, 504]);
        assert_eq!(app.retry, RetrySpec::default());
        assert_eq!(app.retry.max_attempts, 3);
        assert_eq!(app.retry.max_body, 64 * 1024);
        assert_eq!(app.health_check, None);

        let route = &spec.routes[0];
        assert_eq!((route.name.as_str(), route.upstream), ("/api", 0));
        assert_eq!(route.max_body_size, 10 << 20);
        assert!(!spec.has_idempotent_routes());

        assert_eq!(spec.drain, DrainSpec::default());
        assert_eq!(
            spec.drain.pace,
            DrainPace::Batch {
                size: 10_000,
                interval: Duration::from_secs(2),
            }
        );
        assert_eq!(spec.drain.deadline, Duration::from_secs(30));
        assert_eq!(spec.log.level, "info");
        assert_eq!(spec.log.format, LogFormat::Text);
        assert!(spec.log.access_log);
    }

    #[test]
    fn tables_switched_off_arrive_as_none() {
        let text = format!(
            "{MINIMAL}[routes.idempotency]\nenabled = false\nmethods = [\"PUT\"]\n\
             [routes.stale]\nenabled = false\n"
        );
        let route = &spec(&text).routes[0];
        assert_eq!(route.idempotency, None);
        assert_eq!(route.stale, None);
        // Breakers and retries off keep their settings, marked off.
        let text = MINIMAL.replace(
            "[[routes]]",
            "[upstreams.app.breaker]\nenabled = false\n[upstreams.app.retry]\nenabled = false\n[[routes]]",
        );
        let app = &spec(&text).upstreams[0];
        assert!(!app.breaker.enabled);
        assert_eq!(app.breaker.failure_statuses, [502, 503, 504]);
        assert!(!app.retry.enabled);
    }

    #[test]
    fn each_store_kind_carries_its_own_settings() {
        let store = |table: &str| spec(&format!("{MINIMAL}[store]\n{table}")).store.backend;
        assert_eq!(
            store("kind = \"embedded\"\n"),
            StoreBackend::Embedded {
                path: PathBuf::from("keel-data"),
                durable_claims: true,
            }
        );
        assert_eq!(
            store("kind = \"embedded\"\npath = \"/var/keel\"\ndurable_claims = false\n"),
            StoreBackend::Embedded {
                path: PathBuf::from("/var/keel"),
                durable_claims: false,
            }
        );
        assert_eq!(
            store("kind = \"memory\"\nmax_bytes = \"1MiB\"\nmax_bytes_per_tenant = \"64KiB\"\n"),
            StoreBackend::Memory {
                max_bytes: 1 << 20,
                max_bytes_per_tenant: 64 * 1024,
            }
        );
        assert_eq!(
            store("kind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n"),
            StoreBackend::Redis {
                url: "redis://127.0.0.1:6379/".into(),
                prefix: "keel".into(),
            }
        );
        assert_eq!(
            store("kind = \"postgres\"\nurl = \"postgres://u@h/db\"\nprefix = \"k2\"\n"),
            StoreBackend::Postgres {
                url: "postgres://u@h/db".into(),
                prefix: "k2".into(),
            }
        );
    }

    #[test]
    fn drain_strategies_carry_the_keys_they_read() {
        let pace = |table: &str| spec(&format!("{MINIMAL}[drain]\n{table}")).drain.pace;
        assert_eq!(
            pace("batch_size = 3\nbatch_interval = \"1s\"\n"),
            DrainPace::Batch {
                size: 3,
                interval: Duration::from_secs(1),
            }
        );
        assert_eq!(
            pace("strategy = \"gradual\"\ngradual_over = \"7s\"\n"),
            DrainPace::Gradual {
                over: Duration::from_secs(7),
            }
        );
    }

    #[test]
    fn the_examples_convert() {
        for text in [
            include_str!("../../../examples/keel-embedded.toml"),
            include_str!("../../../examples/keel-redis.toml"),
            include_str!("../../../examples/keel-postgres.toml"),
        ] {
            let spec = spec(text);
            for route in &spec.routes {
                assert!(route.upstream < spec.upstreams.len());
            }
        }
    }
}
