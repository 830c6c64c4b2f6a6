//! The admin contract: documents round-trip through JSON unchanged, keep
//! their wire shape, and the server answers each route from a backend.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use keel_admin::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn progress(closed: u64) -> DrainProgress {
    DrainProgress {
        total: 10,
        signalled: 8,
        closed,
        remaining: 10 - closed,
        forced: 1,
        elapsed_ms: 1500,
        expected_finish_ms: 4000,
        done: false,
    }
}

fn breaker(mode: BreakerMode) -> BreakerSnapshot {
    BreakerSnapshot {
        name: "app".into(),
        state: BreakerState::HalfOpen,
        mode,
        retry_after_ms: Some(1250),
        consecutive_trips: 2,
        alarm: true,
        window: BreakerWindow {
            calls: 10,
            failures: 4,
            slow: 1,
        },
        counters: BreakerCounters {
            successes: 1,
            failures: 2,
            slow: 3,
            ignored: 4,
            rejected: 5,
            shadow_rejected: 6,
            fault_injected: 7,
            trips: 8,
        },
    }
}

fn drain_report() -> DrainReport {
    DrainReport {
        phase: DrainPhase::ShutdownDelay,
        connections: 12,
        tunnels: Some(progress(3)),
        http: None,
        endpoints: vec![EndpointDrainReport {
            upstream: "app".into(),
            endpoint: "http://blue:3000".into(),
            draining: true,
            progress: progress(4),
        }],
        started: None,
    }
}

/// A status with every optional part present somewhere and absent
/// somewhere else.
fn sample_status() -> Status {
    Status {
        version: "0.1.0".into(),
        uptime_seconds: 42,
        listen: "127.0.0.1:8080".into(),
        ready: false,
        readiness: vec![
            Condition {
                name: "listeners".into(),
                ready: true,
                reason: None,
            },
            Condition {
                name: "store".into(),
                ready: false,
                reason: Some("connecting".into()),
            },
        ],
        connections: 7,
        draining: true,
        upstreams: vec![UpstreamStatus {
            name: "app".into(),
            load_balancing: "round_robin".into(),
            endpoints: vec![
                EndpointStatus {
                    url: "http://blue:3000".into(),
                    in_flight: 2,
                    open_connections: 3,
                    connects: 9,
                    resilience: EndpointResilience {
                        breaker: Some(breaker(BreakerMode::Normal)),
                        health: Some(HealthStatus {
                            healthy: false,
                            passed: 5,
                            failed: 6,
                        }),
                    },
                },
                EndpointStatus {
                    url: "http://green:3000".into(),
                    in_flight: 0,
                    open_connections: 0,
                    connects: 0,
                    resilience: EndpointResilience {
                        breaker: None,
                        health: None,
                    },
                },
            ],
            breaker: Some(breaker(BreakerMode::ForcedOpen)),
        }],
        routes: vec![
            RouteStatus {
                name: "pay".into(),
                path_prefix: "/pay".into(),
                host: Some("api.example.com".into()),
                upstream: Some("app".into()),
                idempotency: true,
                stale_cache_bytes: Some(1024),
            },
            RouteStatus {
                name: "/".into(),
                path_prefix: "/".into(),
                host: None,
                upstream: None,
                idempotency: false,
                stale_cache_bytes: None,
            },
        ],
        supervision: Some(SupervisionNode {
            name: "keel".into(),
            path: "keel".into(),
            kind: "supervisor".into(),
            strategy: Some("one_for_one".into()),
            state: "running".into(),
            ready: false,
            required: true,
            reason: None,
            restarts: 0,
            uptime_ms: Some(4000),
            last_exit: None,
            escalation: Some(Escalation {
                child: "keel/store".into(),
                restarts: 11,
            }),
            children: vec![SupervisionNode {
                name: "store".into(),
                path: "keel/store".into(),
                kind: "worker".into(),
                strategy: None,
                state: "restarting".into(),
                ready: false,
                required: false,
                reason: Some("redis unreachable".into()),
                restarts: 3,
                uptime_ms: None,
                last_exit: Some("error: refused".into()),
                escalation: None,
                children: vec![],
            }],
        }),
        drain: drain_report(),
    }
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let text = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, value, "{text}");
}

#[test]
fn every_document_round_trips() {
    round_trip(&sample_status());
    round_trip(&Status {
        supervision: None,
        ..sample_status()
    });
    round_trip(&ReadinessReport::of(sample_status().readiness));
    round_trip(&DrainReport {
        started: Some(true),
        phase: DrainPhase::Done,
        ..drain_report()
    });
    round_trip(&EndpointDrainStarted {
        upstream: "app".into(),
        endpoint: "http://blue:3000".into(),
        progress: progress(0),
    });
    round_trip(&EndpointResumed {
        upstream: "app".into(),
        endpoint: "http://blue:3000".into(),
        was_draining: true,
    });
    for mode in [
        BreakerMode::Normal,
        BreakerMode::Disabled,
        BreakerMode::MetricsOnly,
        BreakerMode::ForcedOpen,
    ] {
        round_trip(&breaker(mode));
    }
    let key = KeyAnswer {
        route: "pay".into(),
        method: "POST".into(),
        path: "/pay".into(),
        key: "k1".into(),
        state: "in_flight".into(),
        status: None,
        request_id: Some("req-1".into()),
        expires_in_ms: Some(900),
        token: Some(7),
        removed: None,
    };
    round_trip(&key);
    round_trip(&KeyAnswer {
        removed: Some(true),
        status: Some(201),
        ..key
    });
    round_trip(&ErrorBody::new("no"));
    round_trip(&ErrorBody {
        error: "unknown upstream \"x\"".into(),
        upstreams: Some(vec!["app".into()]),
    });
}

#[test]
fn the_wire_shape_is_what_the_docs_say() {
    let value = serde_json::to_value(sample_status()).unwrap();
    // Sometimes null: written as null.
    assert!(value["routes"][1]["host"].is_null());
    assert!(value["routes"][1].as_object().unwrap().contains_key("host"));
    assert!(
        value["upstreams"][0]["endpoints"][1]["resilience"]
            .as_object()
            .unwrap()
            .contains_key("health")
    );
    assert!(value["drain"]["http"].is_null());
    // Sometimes absent: left out.
    assert!(
        !value["readiness"][0]
            .as_object()
            .unwrap()
            .contains_key("reason")
    );
    assert!(!value["drain"].as_object().unwrap().contains_key("started"));
    let store = &value["supervision"]["children"][0];
    assert!(!store.as_object().unwrap().contains_key("children"));
    assert!(!store.as_object().unwrap().contains_key("strategy"));
    assert!(store["escalation"].is_null());
    // Enumerations in snake_case.
    assert_eq!(value["drain"]["phase"], "shutdown_delay");
    assert_eq!(value["upstreams"][0]["breaker"]["mode"], "forced_open");
    assert_eq!(value["upstreams"][0]["breaker"]["state"], "half_open");
    // A document from an older or newer gateway still reads.
    let mut older = value.clone();
    older["drain"]
        .as_object_mut()
        .unwrap()
        .insert("something_new".into(), 1.into());
    older["routes"][1].as_object_mut().unwrap().remove("host");
    let read: Status = serde_json::from_value(older).unwrap();
    assert_eq!(read.routes[1].host, None);
}

#[test]
fn status_renders_for_a_terminal() {
    let text = render_status(&sample_status());
    let expected = "\
keel 0.1.0  listen 127.0.0.1:8080  up 42s  NOT READY  connections 7  DRAINING
  readiness listeners    ok
  readiness store        not ready (connecting)
upstreams:
  app (round_robin)
    breaker HALF_OPEN [FORCED_OPEN] retry in 1.2s trips 8 rejected 5
    http://blue:3000             in_flight 2 open 3 connects 9
      breaker HALF_OPEN retry in 1.2s trips 8 rejected 5  health EJECTED (passed 5, failed 6)
    http://green:3000            in_flight 0 open 0 connects 0
      breaker off  health not checked
routes:
  /pay                 -> app  [idempotent]
  /                    -> -
drain: shutdown_delay
  app http://blue:3000: draining closed 4/10
supervision:
  keel         running    not ready restarts 0
    store        restarting not ready restarts 3  (redis unreachable)
";
    assert_eq!(text, expected);
    let bare = render_status(&Status {
        supervision: None,
        ..sample_status()
    });
    assert!(bare.ends_with("supervision:\n  (not reported)\n"), "{bare}");
}

/// A backend that records what it was asked.
#[derive(Default)]
struct Fake {
    asked: Mutex<Vec<String>>,
    keys: Option<FakeKeys>,
}

struct FakeKeys;

impl IdempotencyKeys for FakeKeys {
    fn lookup<'a>(
        &'a self,
        query: &'a KeyQuery,
        remove: bool,
    ) -> BoxFuture<'a, Result<KeyAnswer, KeyError>> {
        Box::pin(async move {
            if query.route != "pay" {
                return Err(KeyError::BadRequest(format!("no route {:?}", query.route)));
            }
            if query.key == "down" {
                return Err(KeyError::Unavailable("store down".into()));
            }
            Ok(KeyAnswer {
                route: query.route.clone(),
                method: query.method.clone().unwrap_or_else(|| "POST".into()),
                path: query.path.clone().unwrap_or_else(|| "/pay".into()),
                key: query.key.clone(),
                state: "completed".into(),
                status: Some(201),
                request_id: None,
                expires_in_ms: Some(1000),
                token: None,
                removed: remove.then_some(true),
            })
        })
    }
}

impl AdminBackend for Fake {
    fn status(&self) -> Status {
        sample_status()
    }
    fn readiness(&self) -> ReadinessReport {
        ReadinessReport::of(sample_status().readiness)
    }
    fn metrics_text(&self) -> String {
        "# EOF\n".into()
    }
    fn drain_report(&self) -> DrainReport {
        drain_report()
    }
    fn start_drain(&self) -> bool {
        self.asked.lock().unwrap().push("drain".into());
        true
    }
    fn drain_endpoint(
        &self,
        upstream: &str,
        endpoint: &str,
    ) -> Result<DrainProgress, EndpointDrainError> {
        self.asked
            .lock()
            .unwrap()
            .push(format!("drain {upstream} {endpoint}"));
        match upstream {
            "app" => Ok(progress(0)),
            "last" => Err(EndpointDrainError::LastEndpoint(endpoint.into())),
            _ => Err(EndpointDrainError::NoUpstream(upstream.into())),
        }
    }
    fn resume_endpoint(&self, upstream: &str, _: &str) -> Result<bool, EndpointDrainError> {
        match upstream {
            "app" => Ok(true),
            _ => Err(EndpointDrainError::NoUpstream(upstream.into())),
        }
    }
    fn upstream_names(&self) -> Vec<String> {
        vec!["app".into(), "off".into()]
    }
    fn breaker_action(
        &self,
        upstream: &str,
        action: BreakerAction,
    ) -> Result<BreakerSnapshot, BreakerActionError> {
        self.asked
            .lock()
            .unwrap()
            .push(format!("{} {upstream}", action.as_str()));
        match upstream {
            "off" => Err(BreakerActionError::Disabled(upstream.into())),
            _ => Ok(breaker(BreakerMode::ForcedOpen)),
        }
    }
    fn idempotency_keys(&self) -> Option<&dyn IdempotencyKeys> {
        self.keys.as_ref().map(|k| k as &dyn IdempotencyKeys)
    }
}

async fn ask(backend: &Fake, method: Method, uri: &str) -> (StatusCode, String, String) {
    let request = Request::builder().method(method).uri(uri).body(()).unwrap();
    let response = answer(backend, &request).await;
    let status = response.status();
    let content_type = response.headers()[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn the_server_routes_each_request_to_its_answer() {
    let fake = Fake::default();
    let (status, kind, body) = ask(&fake, Method::GET, "/healthz").await;
    assert_eq!(
        (status, kind.as_str(), body.as_str()),
        (StatusCode::OK, "text/plain", "ok\n")
    );

    let (status, _, body) = ask(&fake, Method::GET, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // One line, keys in order.
    assert_eq!(
        body,
        "{\"conditions\":[{\"name\":\"listeners\",\"ready\":true},{\"name\":\"store\",\"ready\":false,\"reason\":\"connecting\"}],\"ready\":false}\n"
    );

    let (status, kind, body) = ask(&fake, Method::GET, "/status").await;
    assert_eq!(
        (status, kind.as_str()),
        (StatusCode::OK, "application/json")
    );
    assert!(body.starts_with("{\n  \"connections\": 7,\n"), "{body}");
    assert_eq!(
        serde_json::from_str::<Status>(&body).unwrap(),
        sample_status()
    );

    let (status, kind, _) = ask(&fake, Method::GET, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(kind.starts_with("application/openmetrics-text"));

    assert_eq!(
        ask(&fake, Method::GET, "/nope").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        ask(&fake, Method::PUT, "/status").await,
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain".into(),
            "GET only\n".into()
        )
    );
}

#[tokio::test]
async fn drains_are_started_and_refused_with_reasons() {
    let fake = Fake::default();
    let (status, _, body) = ask(&fake, Method::POST, "/drain").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let report: DrainReport = serde_json::from_str(&body).unwrap();
    assert_eq!(report.started, Some(true));
    let (status, _, body) = ask(&fake, Method::GET, "/drain").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("started"));
    assert_eq!(
        ask(&fake, Method::DELETE, "/drain").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );

    let (status, _, body) = ask(
        &fake,
        Method::POST,
        "/upstreams/app/endpoints/drain?endpoint=http%3A%2F%2Fblue%3A3000",
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let started: EndpointDrainStarted = serde_json::from_str(&body).unwrap();
    assert_eq!(started.endpoint, "http://blue:3000");
    let (status, _, body) = ask(
        &fake,
        Method::POST,
        "/upstreams/app/endpoints/resume?endpoint=x",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        serde_json::from_str::<EndpointResumed>(&body)
            .unwrap()
            .was_draining
    );

    let (status, _, body) = ask(&fake, Method::POST, "/upstreams/app/endpoints/drain").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("add ?endpoint=URL"), "{body}");
    let (status, _, body) = ask(
        &fake,
        Method::POST,
        "/upstreams/last/endpoints/drain?endpoint=a",
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("last endpoint"), "{body}");
    let (status, _, body) = ask(
        &fake,
        Method::POST,
        "/upstreams/my%20app/endpoints/drain?endpoint=a",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        serde_json::from_str::<ErrorBody>(&body).unwrap().error,
        "no upstream named \"my app\""
    );
    assert_eq!(
        ask(
            &fake,
            Method::GET,
            "/upstreams/app/endpoints/drain?endpoint=a"
        )
        .await
        .0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        ask(
            &fake,
            Method::POST,
            "/upstreams/app/endpoints/explode?endpoint=a"
        )
        .await
        .0,
        StatusCode::METHOD_NOT_ALLOWED,
        "not a drain route: the GET-only answer"
    );
    assert_eq!(
        fake.asked.lock().unwrap().first().map(String::as_str),
        Some("drain")
    );
}

#[tokio::test]
async fn breaker_overrides_check_the_upstream_before_the_action() {
    let fake = Fake::default();
    let (status, _, body) = ask(&fake, Method::POST, "/breakers/app/melt").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.matches('\n').count(), 1, "one line: {body}");
    assert_eq!(
        serde_json::from_str::<BreakerSnapshot>(&body).unwrap().mode,
        BreakerMode::ForcedOpen
    );
    let (status, _, body) = ask(&fake, Method::POST, "/breakers/nope/explode").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error: ErrorBody = serde_json::from_str(&body).unwrap();
    assert_eq!(error.error, "unknown upstream \"nope\"");
    assert_eq!(error.upstreams, Some(vec!["app".into(), "off".into()]));
    let (status, _, body) = ask(&fake, Method::POST, "/breakers/app/explode").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body.contains("use melt, reset, disable or enable"),
        "{body}"
    );
    let (status, _, body) = ask(&fake, Method::POST, "/breakers/app").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("POST /breakers/{upstream}"), "{body}");
    let (status, _, body) = ask(&fake, Method::POST, "/breakers/off/reset").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("disabled for upstream \\\"off\\\""), "{body}");
    assert_eq!(
        *fake.asked.lock().unwrap(),
        ["melt app".to_owned(), "reset off".to_owned()]
    );
}

#[tokio::test]
async fn idempotency_keys_are_looked_up_and_released() {
    let none = Fake::default();
    assert_eq!(
        ask(&none, Method::GET, "/idempotency/keys?route=pay&key=k").await,
        (
            StatusCode::NOT_FOUND,
            "application/json".into(),
            "{\"error\":\"no route is idempotent\"}\n".into()
        )
    );
    let fake = Fake {
        keys: Some(FakeKeys),
        ..Fake::default()
    };
    assert_eq!(
        ask(&fake, Method::POST, "/idempotency/keys?route=pay&key=k")
            .await
            .0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let (status, _, body) = ask(&fake, Method::GET, "/idempotency/keys?route=pay").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("give route="), "{body}");
    let (status, _, body) = ask(
        &fake,
        Method::GET,
        "/idempotency/keys?route=pay&key=a%20b&path=%2Fpay%2F1",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let found: KeyAnswer = serde_json::from_str(&body).unwrap();
    assert_eq!((found.key.as_str(), found.path.as_str()), ("a b", "/pay/1"));
    assert_eq!(found.removed, None);
    assert!(!body.contains("removed"));
    let (_, _, body) = ask(&fake, Method::DELETE, "/idempotency/keys?route=pay&key=k").await;
    assert_eq!(
        serde_json::from_str::<KeyAnswer>(&body).unwrap().removed,
        Some(true)
    );
    assert_eq!(
        ask(&fake, Method::GET, "/idempotency/keys?route=other&key=k")
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        ask(&fake, Method::GET, "/idempotency/keys?route=pay&key=down")
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn the_client_reads_what_the_server_writes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}/", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let backend = Arc::new(Fake {
        keys: Some(FakeKeys),
        ..Fake::default()
    });
    let server = tokio::spawn(serve(
        listener,
        backend,
        AdminLimits {
            max_connections: 1,
            ..AdminLimits::default()
        },
        stopped,
    ));
    assert_eq!(fetch_status(&addr).await.unwrap(), sample_status());
    assert_eq!(fetch_drain(&addr).await.unwrap(), drain_report());
    assert_eq!(start_drain(&addr).await.unwrap().started, Some(true));
    assert_eq!(
        drain_endpoint(&addr, "app", "http://blue:3000")
            .await
            .unwrap()
            .endpoint,
        "http://blue:3000"
    );
    assert!(
        resume_endpoint(&addr, "app", "x")
            .await
            .unwrap()
            .was_draining
    );
    let refused = drain_endpoint(&addr, "last", "x").await.unwrap_err();
    assert!(
        matches!(&refused, StatusError::Refused { status, .. } if *status == StatusCode::CONFLICT),
        "{refused}"
    );
    assert_eq!(
        breaker_action(&addr, "app", BreakerAction::Reset)
            .await
            .unwrap()
            .name,
        "app"
    );
    let question = KeyQuery {
        route: "pay".into(),
        key: "k/1 &".into(),
        method: Some("PUT".into()),
        ..KeyQuery::default()
    };
    let found = idempotency_key(&addr, &question, true).await.unwrap();
    assert_eq!(
        (found.key.as_str(), found.method.as_str()),
        ("k/1 &", "PUT")
    );
    assert_eq!(found.removed, Some(true));
    stop.send_replace(true);
    server.await.unwrap();
    // Stopped: nobody answers any more.
    assert!(matches!(
        fetch_status(&addr).await,
        Err(StatusError::Unreachable { .. })
    ));
}
