//! (host, path) -> route. Pure and allocation-free per lookup.
//!
//! Neighbours: `conn.rs` hands the parsed head to `proxy.rs`, which asks this module for the route
//! before it picks a server.
//!
//! Precedence, as an nginx user expects from `server_name` and prefix `location`s, but over one
//! flat list of routes: an exact host beats the longest matching `*.suffix` wildcard, which beats
//! routes with no host; within the chosen group the longest path prefix wins. When a host group has
//! no route whose prefix matches the path, the lookup falls through to the next, less specific
//! group, so a host-less `path = "/"` route is a default for every host.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::snapshot::{HostMatch, Route};

#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<Box<str>, Group>,
    /// Keyed by the suffix with its leading dot (`.example.com`).
    suffix: HashMap<Box<str>, Group>,
    any: Group,
}

/// Routes sharing one host matcher, longest prefix first.
#[derive(Debug, Default)]
struct Group {
    routes: Vec<(Box<str>, Arc<Route>)>,
}

impl Group {
    fn push(&mut self, route: &Arc<Route>) {
        self.routes
            .push((route.path.as_str().into(), Arc::clone(route)));
    }

    fn finish(&mut self) {
        // Stable sort keeps file order among equal prefixes; compile.rs rejects exact duplicates.
        self.routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    }

    fn find(&self, path: &[u8]) -> Option<&Arc<Route>> {
        self.routes
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_bytes()))
            .map(|(_, route)| route)
    }
}

impl Router {
    pub fn build(routes: &[Arc<Route>]) -> Router {
        let mut router = Router::default();
        for route in routes {
            match &route.host {
                Some(HostMatch::Exact(host)) => router
                    .exact
                    .entry(host.as_str().into())
                    .or_default()
                    .push(route),
                Some(HostMatch::Suffix(suffix)) => router
                    .suffix
                    .entry(suffix.as_str().into())
                    .or_default()
                    .push(route),
                None => router.any.push(route),
            }
        }
        router.exact.values_mut().for_each(Group::finish);
        router.suffix.values_mut().for_each(Group::finish);
        router.any.finish();
        router
    }

    /// `host` is the request's host without port, already lower-cased by the caller (or empty);
    /// `path` is the request target's path, without the query.
    pub fn find(&self, host: &str, path: &[u8]) -> Option<&Arc<Route>> {
        if !host.is_empty() {
            if let Some(route) = self.exact.get(host).and_then(|g| g.find(path)) {
                return Some(route);
            }
            if !self.suffix.is_empty() {
                // Try `.b.c` then `.c` for host `a.b.c`: the longest suffix first.
                let mut rest = host;
                while let Some(dot) = rest.find('.') {
                    let suffix = &rest[dot..];
                    if let Some(route) = self.suffix.get(suffix).and_then(|g| g.find(path)) {
                        return Some(route);
                    }
                    rest = &rest[dot + 1..];
                }
            }
        }
        self.any.find(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::snapshot::{FixedResponse, RouteAction};
    use std::time::Duration;

    fn route(name: &str, host: Option<HostMatch>, path: &str) -> Arc<Route> {
        Arc::new(Route {
            name: name.into(),
            host,
            path: path.to_string(),
            action: RouteAction::Respond(FixedResponse {
                status: 200,
                body: bytes::Bytes::new(),
                content_type: "text/plain".into(),
            }),
            max_body_bytes: 0,
            client_body_timeout: Duration::from_secs(1),
            upstream_timeouts: None,
            access_log: true,
            metrics: Default::default(),
        })
    }

    fn name<'a>(r: &'a Router, host: &str, path: &str) -> Option<&'a str> {
        r.find(host, path.as_bytes()).map(|r| &*r.name)
    }

    #[test]
    fn longest_prefix_wins_regardless_of_file_order() {
        let r = Router::build(&[
            route("root", None, "/"),
            route("api", None, "/api/"),
            route("v2", None, "/api/v2/"),
        ]);
        assert_eq!(name(&r, "", "/api/v2/x"), Some("v2"));
        assert_eq!(name(&r, "", "/api/v1"), Some("api"));
        assert_eq!(name(&r, "", "/apix"), Some("root"));
        assert_eq!(name(&r, "", "/"), Some("root"));
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any() {
        let r = Router::build(&[
            route("any", None, "/"),
            route("wild", Some(HostMatch::Suffix(".example.com".into())), "/"),
            route(
                "deep",
                Some(HostMatch::Suffix(".b.example.com".into())),
                "/",
            ),
            route(
                "exact",
                Some(HostMatch::Exact("app.example.com".into())),
                "/",
            ),
        ]);
        assert_eq!(name(&r, "app.example.com", "/"), Some("exact"));
        assert_eq!(name(&r, "x.example.com", "/"), Some("wild"));
        assert_eq!(name(&r, "a.b.example.com", "/"), Some("deep"));
        assert_eq!(name(&r, "example.com", "/"), Some("any"));
        assert_eq!(name(&r, "other.org", "/"), Some("any"));
        assert_eq!(name(&r, "", "/"), Some("any"));
    }

    #[test]
    fn host_group_without_matching_path_falls_through() {
        let r = Router::build(&[
            route(
                "api",
                Some(HostMatch::Exact("app.example.com".into())),
                "/api/",
            ),
            route("welcome", None, "/"),
        ]);
        assert_eq!(name(&r, "app.example.com", "/api/users"), Some("api"));
        assert_eq!(name(&r, "app.example.com", "/"), Some("welcome"));
        assert_eq!(name(&r, "other.example.com", "/api/users"), Some("welcome"));
    }

    #[test]
    fn no_match_is_none() {
        let r = Router::build(&[route("api", None, "/api/")]);
        assert_eq!(name(&r, "", "/other"), None);
    }
}
