//! Routing: the longest `path_prefix` wins; a route with a `host` beats one
//! without at equal length; `methods` narrows a route further.

use std::sync::Arc;

use http::Method;

use crate::filter::RequestFilter;
use keel_metrics::RouteMetrics;

/// A route ready to serve.
pub struct Route {
    /// Name for metrics and logs.
    pub name: String,
    /// Path prefix.
    pub prefix: String,
    /// Host (lower case, no port), when the route is host-specific.
    pub host: Option<String>,
    /// Allowed methods; all when `None`.
    pub methods: Option<Vec<Method>>,
    /// Index into the gateway's upstreams.
    pub upstream: usize,
    /// Body limit in bytes.
    pub max_body_size: u64,
    /// Metric handles.
    pub metrics: RouteMetrics,
    /// The request filter (idempotency plugs in here); `None` for plain routes.
    pub filter: Option<Arc<dyn RequestFilter>>,
    /// The stale-fallback cache, on routes with `[routes.stale]`.
    pub stale: Option<crate::stale::StaleCache>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// The routing table.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Builds a table; order of `routes` does not matter.
    pub fn new(mut routes: Vec<Route>) -> Self {
        // Longest prefix first; host-specific before host-less; method-specific
        // before any-method, so a linear scan finds the best match first.
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(b.host.is_some().cmp(&a.host.is_some()))
                .then(b.methods.is_some().cmp(&a.methods.is_some()))
        });
        Router { routes }
    }

    /// All routes, best match first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for a request, if any. `host` may carry a port.
    pub fn find(&self, host: Option<&str>, method: &Method, path: &str) -> Option<&Route> {
        let host = host.map(strip_port);
        self.routes.iter().find(|route| {
            path.starts_with(route.prefix.as_str())
                && route
                    .host
                    .as_deref()
                    .is_none_or(|want| host.is_some_and(|h| h.eq_ignore_ascii_case(want)))
                && route.methods.as_ref().is_none_or(|m| m.contains(method))
        })
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port; an unclosed bracket (refused earlier, but this must
        // not panic on it either) is kept whole.
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_metrics::Metrics;

    #[test]
    fn ports_come_off_hosts_without_panicking() {
        assert_eq!(strip_port("a.test:8080"), "a.test");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1"), "[::1");
        assert_eq!(strip_port("a.test"), "a.test");
    }

    fn route(
        prefix: &str,
        host: Option<&str>,
        methods: Option<Vec<Method>>,
        upstream: usize,
    ) -> Route {
        Route {
            name: prefix.to_owned(),
            prefix: prefix.to_owned(),
            host: host.map(str::to_owned),
            methods,
            upstream,
            max_body_size: 0,
            metrics: Metrics::new().route(prefix),
            filter: None,
            stale: None,
        }
    }

    #[test]
    fn longest_prefix_then_host_then_methods() {
        let router = Router::new(vec![
            route("/", None, None, 0),
            route("/api", None, None, 1),
            route("/api", Some("a.test"), None, 2),
            route("/api/orders", None, Some(vec![Method::POST]), 3),
        ]);
        let find =
            |host, method: Method, path| router.find(host, &method, path).map(|r| r.upstream);
        assert_eq!(find(None, Method::GET, "/x"), Some(0));
        assert_eq!(find(None, Method::GET, "/api/x"), Some(1));
        assert_eq!(find(Some("A.test:8080"), Method::GET, "/api/x"), Some(2));
        assert_eq!(find(Some("b.test"), Method::GET, "/api/x"), Some(1));
        assert_eq!(find(None, Method::POST, "/api/orders/1"), Some(3));
        assert_eq!(find(None, Method::GET, "/api/orders/1"), Some(1));
        let only_api = Router::new(vec![route("/api", None, None, 0)]);
        assert!(only_api.find(None, &Method::GET, "/other").is_none());
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
