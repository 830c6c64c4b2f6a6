//! Idempotent routes end to end: the real `keel` binary, real sockets, a
//! real HTTP client, and the embedded, Redis and PostgreSQL stores.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    Keel, TcpProxy, TestUpstream, echo, free_addr, get, post_keyed, redis_host_port, temp_file,
    unique_name, wait_ready,
};
use http::StatusCode;

/// `[store]` plus one upstream and two routes: `/` idempotent (keys
/// optional), `/plain` not.
fn routes(store: &str, upstream: SocketAddr) -> String {
    format!(
        r#"
{store}

[upstreams.app]
endpoints = ["http://{upstream}"]
request_timeout = "5s"

[[routes]]
name = "plain"
path_prefix = "/plain"
upstream = "app"

[[routes]]
name = "api"
path_prefix = "/"
upstream = "app"

[routes.idempotency]
enabled = true
"#
    )
}

fn embedded(dir: &std::path::Path) -> String {
    format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n",
        dir.display()
    )
}

fn redis(url: &str, prefix: &str) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{url}\"\nprefix = \"{prefix}\"\ntimeout = \"300ms\"\n"
    )
}

fn postgres(url: &str, prefix: &str) -> String {
    format!("[store]\nkind = \"postgres\"\nurl = \"{url}\"\nprefix = \"{prefix}\"\n")
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn problem_type(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("problem+json");
    v["type"].as_str().unwrap_or("").to_owned()
}

/// Replay, mismatch, tenant isolation and 32 concurrent duplicates against
/// whatever store `keel` runs with.
async fn exercise(keel: &Keel, upstream: &TestUpstream) {
    let gw = keel.listen;
    let key = unique_name("key");

    // First request executes.
    let before = upstream.requests();
    let (status, headers, body) = post_keyed(
        gw,
        "/charges",
        Some(&key),
        Some("Bearer alice"),
        r#"{"amount":100}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "idempotent-replayed"), None);
    let first_id = header(&headers, "x-request-id")
        .expect("request id")
        .to_owned();
    assert_eq!(upstream.requests(), before + 1);

    // The retry is replayed: same status and body, not run again.
    let (status, replay_headers, replay_body) = post_keyed(
        gw,
        "/charges",
        Some(&key),
        Some("Bearer alice"),
        r#"{"amount":100}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&replay_headers, "idempotent-replayed"), Some("true"));
    assert_eq!(
        header(&replay_headers, "original-request-id"),
        Some(first_id.as_str())
    );
    assert_eq!(
        header(&replay_headers, "content-type"),
        Some("application/json")
    );
    assert_eq!(replay_body, body);
    assert_eq!(upstream.requests(), before + 1);

    // Same key, different body: 422, nothing runs.
    let (status, headers, problem) = post_keyed(
        gw,
        "/charges",
        Some(&key),
        Some("Bearer alice"),
        r#"{"amount":999}"#,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        problem_type(&problem),
        "urn:keel:problem:idempotency-key-reused"
    );
    assert_eq!(upstream.requests(), before + 1);

    // Another tenant with the same key is a different record.
    let (status, headers, _) = post_keyed(
        gw,
        "/charges",
        Some(&key),
        Some("Bearer bob"),
        r#"{"amount":100}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "idempotent-replayed"), None);
    assert_eq!(upstream.requests(), before + 2);

    // 32 concurrent duplicates of a slow request: exactly one execution;
    // the others get 409 (still running) or the replay (finished).
    let key = unique_name("conc");
    let before = upstream.requests();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let key = key.clone();
            tokio::spawn(async move {
                post_keyed(gw, "/slow/300", Some(&key), Some("Bearer carol"), "{}").await
            })
        })
        .collect();
    let mut executed = 0;
    for task in tasks {
        let (status, headers, body) = task.await.expect("task");
        match status {
            StatusCode::OK if header(&headers, "idempotent-replayed").is_none() => executed += 1,
            StatusCode::OK => {}
            StatusCode::CONFLICT => {
                assert!(header(&headers, "retry-after").is_some());
                assert_eq!(
                    problem_type(&body),
                    "urn:keel:problem:idempotency-in-flight"
                );
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!(executed, 1);
    assert_eq!(upstream.requests(), before + 1);

    // Requests without a key and GETs pass straight through.
    let before = upstream.requests();
    let (status, _, body) = post_keyed(gw, "/charges", None, None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo(&body)["method"], "POST");
    post_keyed(gw, "/charges", None, None, "{}").await;
    assert_eq!(upstream.requests(), before + 2);

    // The outcomes are counted.
    let (_, _, metrics) = get(keel.admin, "/metrics").await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    for needle in [
        r#"keel_idempotency_outcomes_total{route="api",outcome="new"}"#,
        r#"keel_idempotency_outcomes_total{route="api",outcome="replayed"}"#,
        r#"keel_idempotency_outcomes_total{route="api",outcome="mismatch"} 1"#,
    ] {
        assert!(metrics.contains(needle), "{needle} missing in\n{metrics}");
    }
}

#[tokio::test]
async fn embedded_store_replays_and_survives_a_restart() {
    let upstream = TestUpstream::start().await;
    let dir = temp_file("marker", "").with_file_name("store");
    let config = routes(&embedded(&dir), upstream.addr);
    let keel = Keel::start("", &config).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    exercise(&keel, &upstream).await;

    let key = unique_name("restart");
    let (status, _, body) = post_keyed(keel.listen, "/orders", Some(&key), None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    let executed = upstream.requests();
    drop(keel); // SIGKILL: completed records are already durable

    let keel = Keel::start("", &config).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    let (status, headers, replay) =
        post_keyed(keel.listen, "/orders", Some(&key), None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "idempotent-replayed"), Some("true"));
    assert_eq!(replay, body);
    assert_eq!(upstream.requests(), executed);

    // The tree and the store condition are reported.
    let (_, _, status) = get(keel.admin, "/status").await.expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status).expect("json");
    let children: Vec<&str> = status["supervision"]["children"]
        .as_array()
        .expect("tree children")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    // The upstream's breakers are on by default: their watchers are
    // supervised too.
    assert_eq!(
        children,
        ["listener", "admin", "store", "breakers", "pools", "drain"]
    );
}

#[tokio::test]
async fn embedded_store_without_claim_syncs_still_runs_each_key_once() {
    let upstream = TestUpstream::start().await;
    let dir = temp_file("marker-fast", "").with_file_name("store-fast");
    let store = format!("{}durable_claims = false\n", embedded(&dir));
    let keel = Keel::start("", &routes(&store, upstream.addr)).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    exercise(&keel, &upstream).await;
}

#[tokio::test]
async fn redis_store_end_to_end() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let upstream = TestUpstream::start().await;
    let keel = Keel::start("", &routes(&redis(&url, &unique_name("r")), upstream.addr)).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    exercise(&keel, &upstream).await;
}

#[tokio::test]
async fn postgres_store_end_to_end() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    let upstream = TestUpstream::start().await;
    let prefix = unique_name("p");
    let keel = Keel::start("", &routes(&postgres(&url, &prefix), upstream.addr)).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    exercise(&keel, &upstream).await;
    drop(keel);
    drop_table(&url, &prefix).await;
}

/// Drops the table a test's gateway created (`<prefix>_idempotency`).
async fn drop_table(url: &str, prefix: &str) {
    if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        tokio::spawn(connection);
        // The table and everything the store created beside it.
        let t = format!("{prefix}_idempotency");
        let _ = client
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {t}; DROP SEQUENCE IF EXISTS {t}_fence_seq; \
                 DROP FUNCTION IF EXISTS {t}_claim(text, bytea, bigint); \
                 DROP FUNCTION IF EXISTS {t}_claim_v2(text, bytea, bigint, bigint);"
            ))
            .await;
    }
}

#[tokio::test]
async fn two_gateways_sharing_redis_run_duplicates_once() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let upstream = TestUpstream::start().await;
    let config = routes(&redis(&url, &unique_name("two")), upstream.addr);
    duplicates_across_two_gateways(&config, &upstream).await;
}

/// The same against a three-primary Redis Cluster the test starts on free
/// ports: the gateways reach it through `cluster_nodes`, and the keys land
/// on more than one primary.
#[tokio::test]
async fn two_gateways_sharing_a_redis_cluster_run_duplicates_once() {
    let Some(cluster) = keel_testkit::redis_server::Cluster::start() else {
        return;
    };
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    let store = format!(
        "[store]\nkind = \"redis\"\ncluster_nodes = [{}]\nprefix = \"{}\"\ntimeout = \"1s\"\n",
        nodes.join(", "),
        unique_name("cluster")
    );
    let upstream = TestUpstream::start().await;
    let config = routes(&store, upstream.addr);
    duplicates_across_two_gateways(&config, &upstream).await;
    // More keys, one request each: they spread over the primaries.
    let keel = Keel::start("", &config).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    for i in 0..30 {
        let key = unique_name(&format!("spread-{i}"));
        let (status, _, _) = post_keyed(keel.listen, "/charges", Some(&key), None, "{}").await;
        assert_eq!(status, StatusCode::OK);
    }
    let counts = cluster.key_counts();
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "keys on more than one primary: {counts:?}"
    );
}

/// 32 concurrent duplicates of one key, split across two gateways sharing
/// `config`'s store: one execution; afterwards either gateway replays.
async fn duplicates_across_two_gateways(config: &str, upstream: &TestUpstream) {
    let a = Keel::start("", config).await;
    let b = Keel::start("", config).await;
    wait_ready(a.admin, StatusCode::OK).await;
    wait_ready(b.admin, StatusCode::OK).await;
    let key = unique_name("split");
    let before = upstream.requests();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let gw = if i % 2 == 0 { a.listen } else { b.listen };
            let key = key.clone();
            tokio::spawn(async move { post_keyed(gw, "/slow/300", Some(&key), None, "{}").await })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task").0);
    }
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::CONFLICT),
        "{statuses:?}"
    );
    assert_eq!(upstream.requests(), before + 1);
    // Afterwards, either gateway replays.
    for gw in [a.listen, b.listen] {
        let (status, headers, _) = post_keyed(gw, "/slow/300", Some(&key), None, "{}").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header(&headers, "idempotent-replayed"), Some("true"));
    }
    assert_eq!(upstream.requests(), before + 1);
}

#[tokio::test]
async fn store_down_fails_closed_then_recovers_without_a_restart() {
    let Some(url) = keel_testkit::service_url(keel_testkit::REDIS) else {
        return;
    };
    let upstream = TestUpstream::start().await;
    // Redis through a proxy that is not running yet: the store is down
    // from the start.
    let proxy_addr = free_addr();
    let store_url = format!("redis://{proxy_addr}/");
    let keel = Keel::start(
        "",
        &routes(&redis(&store_url, &unique_name("down")), upstream.addr),
    )
    .await;

    // Started anyway: plain routes work, the idempotent route fails closed.
    let (status, _, _) = get(keel.listen, "/plain/x").await.expect("plain");
    assert_eq!(status, StatusCode::OK);
    let reason = wait_ready(keel.admin, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        reason.contains("\"reason\":\"store: ") && reason.contains("redis"),
        "{reason}"
    );
    let before = upstream.requests();
    fails_closed(keel.listen, "store never up").await;
    // A keyless POST on the idempotent route still goes through.
    let (status, _, _) = post_keyed(keel.listen, "/pay", None, None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.requests(), before + 1);

    // The store comes up: ready, and keyed requests work.
    let proxy = TcpProxy::start(proxy_addr, redis_host_port(&url)).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    let (status, _, _) = post_keyed(keel.listen, "/pay", Some("k-up"), None, "{}").await;
    assert_eq!(status, StatusCode::OK);

    // It goes away: detected, fail-closed again, plain routes unaffected.
    proxy.stop();
    let reason = wait_ready(keel.admin, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        reason.contains("\"reason\":\"store: ") && reason.contains("redis"),
        "{reason}"
    );
    fails_closed(keel.listen, "store went away").await;
    let (status, _, _) = get(keel.listen, "/plain/y").await.expect("plain");
    assert_eq!(status, StatusCode::OK);

    // And comes back: reconnected with backoff, no restart.
    let _proxy = TcpProxy::start(proxy_addr, redis_host_port(&url)).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    let (status, headers, _) = post_keyed(keel.listen, "/pay", Some("k-up"), None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "idempotent-replayed"), Some("true"));
    let (_, _, metrics) = get(keel.admin, "/metrics").await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains(r#"keel_idempotency_outcomes_total{route="api",outcome="store_error"}"#),
        "{metrics}"
    );
}

async fn fails_closed(gw: SocketAddr, what: &str) {
    let (status, headers, body) = post_keyed(gw, "/pay", Some("k-down"), None, "{}").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}");
    assert!(header(&headers, "retry-after").is_some(), "{what}");
    assert_eq!(
        problem_type(&body),
        "urn:keel:problem:idempotency-store-unavailable",
        "{what}"
    );
}

#[tokio::test]
async fn a_request_the_upstream_never_received_releases_its_claim() {
    let dead = free_addr();
    let keel = Keel::start("", &routes("[store]\nkind = \"memory\"\n", dead)).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    let (status, _, _) = post_keyed(keel.listen, "/pay", Some("k-refused"), None, "{}").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    // The upstream comes up; the retry with the same key executes.
    let upstream = TestUpstream::start_at(dead).await;
    let (status, headers, body) =
        post_keyed(keel.listen, "/pay", Some("k-refused"), None, "{}").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "idempotent-replayed"), None);
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn idempotency_refusals_are_problems_with_the_contract_statuses() {
    let upstream = TestUpstream::start().await;
    let config = format!(
        r#"
[store]
kind = "memory"

[upstreams.app]
endpoints = ["http://{}"]

[[routes]]
name = "strict"
path_prefix = "/"
upstream = "app"

[routes.idempotency]
enabled = true
required = true
max_body = "1KiB"
"#,
        upstream.addr
    );
    let keel = Keel::start("", &config).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    let (status, _, body) = post_keyed(keel.listen, "/pay", None, None, "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        problem_type(&body),
        "urn:keel:problem:idempotency-key-missing"
    );
    let long = "k".repeat(256);
    let (status, _, _) = post_keyed(keel.listen, "/pay", Some(&long), None, "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let big = "x".repeat(2048);
    let (status, _, _) = post_keyed(keel.listen, "/pay", Some("k-big"), None, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(upstream.requests(), 0);
    // A response too large to keep is still delivered, and the key is
    // not run again.
    let (status, _, body) = post_keyed(keel.listen, "/big/32", Some("k-large"), None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 32 * 64 * 1024);
    let (status, _, body) = post_keyed(keel.listen, "/big/32", Some("k-large"), None, "{}").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        problem_type(&body),
        "urn:keel:problem:idempotency-response-not-stored"
    );
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn postgres_going_away_and_back_is_reconnected_without_a_restart() {
    let Some(url) = keel_testkit::service_url(keel_testkit::POSTGRES) else {
        return;
    };
    // postgres://user@host:port/db -> the same through a proxy we control.
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let (userinfo, hostpath) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (hostport, db) = hostpath.split_once('/').unwrap_or((hostpath, ""));
    let target = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let proxy_addr = free_addr();
    let at = if userinfo.is_empty() {
        String::new()
    } else {
        format!("{userinfo}@")
    };
    let store_url = format!("postgres://{at}{proxy_addr}/{db}");
    let upstream = TestUpstream::start().await;
    let proxy = TcpProxy::start(proxy_addr, target.clone()).await;
    let prefix = unique_name("pgdown");
    let keel = Keel::start("", &routes(&postgres(&store_url, &prefix), upstream.addr)).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    let (status, _, _) = post_keyed(keel.listen, "/pay", Some("k-pg"), None, "{}").await;
    assert_eq!(status, StatusCode::OK);

    proxy.stop();
    let reason = wait_ready(keel.admin, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(reason.contains("store: postgres at"), "{reason}");
    fails_closed(keel.listen, "postgres went away").await;

    let _proxy = TcpProxy::start(proxy_addr, target).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    let (status, headers, _) = post_keyed(keel.listen, "/pay", Some("k-pg"), None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "idempotent-replayed"), Some("true"));
    drop(keel);
    drop_table(&url, &prefix).await;
}

/// keel on the memory store in front of `upstream` (its
/// `request_timeout` given), one idempotent route `api` over every path
/// with the given `lease`; ready.
async fn keel_with_lease(upstream: SocketAddr, request_timeout: &str, lease: &str) -> Keel {
    let config = format!(
        r#"
[store]
kind = "memory"

[upstreams.app]
endpoints = ["http://{upstream}"]
request_timeout = "{request_timeout}"

[[routes]]
name = "api"
path_prefix = "/"
upstream = "app"

[routes.idempotency]
enabled = true
lease = "{lease}"
"#
    );
    let keel = Keel::start("", &config).await;
    wait_ready(keel.admin, StatusCode::OK).await;
    keel
}

#[tokio::test]
async fn a_request_lost_after_it_was_sent_locks_the_key_as_outcome_unknown() {
    let upstream = TestUpstream::start().await;
    let keel = keel_with_lease(upstream.addr, "200ms", "5s").await;
    let (status, _, _) = post_keyed(keel.listen, "/slow/1000", Some("k-lost"), None, "{}").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    // The upstream may have run it: never again for this key.
    let (status, _, body) = post_keyed(keel.listen, "/slow/1000", Some("k-lost"), None, "{}").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        problem_type(&body),
        "urn:keel:problem:idempotency-outcome-unknown"
    );
    assert_eq!(upstream.requests(), 1);
}

/// A `lease` shorter than the upstream's `request_timeout` cannot cover a
/// slow upstream phase, so the gateway renews it while the upstream works:
/// a retry arriving after the first lease would have lapsed still finds
/// the request in flight (409), never runs it, and replays it once done.
#[tokio::test]
async fn a_lease_shorter_than_the_upstream_phase_is_renewed_while_it_runs() {
    let upstream = TestUpstream::start().await;
    let keel = keel_with_lease(upstream.addr, "10s", "1s").await;
    let listen = keel.listen;
    let first = tokio::spawn(async move {
        post_keyed(listen, "/slow/3000", Some("k-renewed"), None, "{}").await
    });
    // Past the first lease (1 s) and two renewals' worth of it.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (status, _, body) =
        post_keyed(keel.listen, "/slow/3000", Some("k-renewed"), None, "{}").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        problem_type(&body),
        "urn:keel:problem:idempotency-in-flight"
    );
    let (status, _, _) = first.await.expect("join");
    assert_eq!(status, StatusCode::OK);
    let (status, headers, _) =
        post_keyed(keel.listen, "/slow/3000", Some("k-renewed"), None, "{}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(upstream.requests(), 1);
}
