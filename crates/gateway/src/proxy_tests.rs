//! The filter seam, driven through a real listener: a filter that
//! answers by itself, and one whose response hook sees the outcome,
//! including `sent = false` when the upstream refused the connection.

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use keel_config as config;
use keel_http::ProxyBody;
use keel_metrics::Metrics;
use keel_proxy::filter::{BoxFuture, RequestFilter, ResponseFilter};
use keel_proxy::{ConnectionSettings, DataPlane};
use keel_proxy::{FilterDecision, RequestContext};
use keel_upstream::UpstreamError;
use std::net::SocketAddr;

type Outcomes = Arc<Mutex<Vec<(Option<u16>, bool)>>>;

struct TestFilter {
    outcomes: Outcomes,
}

struct Hook {
    outcomes: Outcomes,
}

impl RequestFilter for TestFilter {
    fn on_request<'a>(
        &'a self,
        ctx: &'a RequestContext<'a>,
        request: Request<ProxyBody>,
    ) -> BoxFuture<'a, FilterDecision> {
        Box::pin(async move {
            if request.headers().contains_key("x-answer-here") {
                let mut response = Response::new(ProxyBody::full("answered by the filter"));
                response.headers_mut().insert(
                    "x-filter-route",
                    HeaderValue::from_str(ctx.route).expect("route name"),
                );
                return FilterDecision::Respond(response);
            }
            FilterDecision::Forward {
                request,
                on_response: Some(Box::new(Hook {
                    outcomes: self.outcomes.clone(),
                })),
            }
        })
    }
}

impl ResponseFilter for Hook {
    fn on_response(
        self: Box<Self>,
        outcome: Result<Response<ProxyBody>, UpstreamError>,
    ) -> BoxFuture<'static, Response<ProxyBody>> {
        Box::pin(async move {
            match outcome {
                Ok(mut response) => {
                    self.outcomes
                        .lock()
                        .expect("lock")
                        .push((Some(response.status().as_u16()), true));
                    response
                        .headers_mut()
                        .insert("x-seen-by-hook", HeaderValue::from_static("yes"));
                    response
                }
                Err(failure) => {
                    self.outcomes
                        .lock()
                        .expect("lock")
                        .push((None, failure.sent));
                    failure.into_problem().into_response(None)
                }
            }
        })
    }
}

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                service_fn(|_| async {
                    Ok::<_, Infallible>(Response::new(ProxyBody::full("from upstream")))
                }),
            ));
        }
    });
    addr
}

async fn get(addr: SocketAddr, path: &str, answer_here: bool) -> Response<bytes::Bytes> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, ProxyBody>(TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let mut request = Request::get(path)
        .header(header::HOST, "seam.test")
        .body(ProxyBody::Empty)
        .expect("request");
    if answer_here {
        request
            .headers_mut()
            .insert("x-answer-here", HeaderValue::from_static("1"));
    }
    let response = sender.send_request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Response::from_parts(parts, body)
}

#[tokio::test]
async fn request_and_response_filters_see_the_whole_exchange() {
    let up = upstream().await;
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [\"http://{up}\"]\n\
         [upstreams.down]\nendpoints = [\"http://{refused}\"]\n\
         [[routes]]\nname = \"up\"\npath_prefix = \"/up\"\nupstream = \"up\"\n\
         [[routes]]\nname = \"down\"\npath_prefix = \"/down\"\nupstream = \"down\"\n"
    );
    let config = config::parse(Path::new("seam.toml"), &text).expect("config");
    let outcomes = Outcomes::default();
    let factory = |_: &config::RouteSpec| -> Option<Arc<dyn RequestFilter>> {
        Some(Arc::new(TestFilter {
            outcomes: outcomes.clone(),
        }))
    };
    let metrics = Metrics::new();
    let gateway = Arc::new(crate::serve::build_proxy(&config, &metrics, &factory));
    let settings = ConnectionSettings {
        idle_timeout: std::time::Duration::from_secs(5),
        max_header_size: 16 * 1024,
        ..ConnectionSettings::default()
    };
    let plane = DataPlane::bind(config.server.listen, gateway, &settings)
        .await
        .expect("bind");
    let addr = plane.local_addr().expect("addr");
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(plane.run(stopped));

    // The filter answers by itself: nothing reaches the upstream.
    let response = get(addr, "/up/x", true).await;
    assert_eq!(response.body().as_ref(), b"answered by the filter");
    assert_eq!(response.headers()["x-filter-route"], "up");
    assert!(response.headers().contains_key("x-request-id"));
    assert!(outcomes.lock().expect("lock").is_empty());

    // Forwarded: the hook sees the upstream's response and can change it.
    let response = get(addr, "/up/x", false).await;
    assert_eq!(response.body().as_ref(), b"from upstream");
    assert_eq!(response.headers()["x-seen-by-hook"], "yes");

    // Connection refused: the hook learns the request was never sent.
    let response = get(addr, "/down/x", false).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        *outcomes.lock().expect("lock"),
        vec![(Some(200), true), (None, false)]
    );
}
