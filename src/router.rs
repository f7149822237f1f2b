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

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::config::snapshot::{HostMatch, Route};

type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
pub struct Router {
    /// Each group is found by its routes' host (see `Borrow<str> for Group`), so the key is not
    /// stored a second time.
    exact: FastSet<Group>,
    /// Keyed by the suffix with its leading dot (`.example.com`).
    suffix: FastSet<Group>,
    any: Vec<Arc<Route>>,
}

/// Routes sharing one host matcher, longest prefix first. Most hosts have a single route, which
/// is then held without a `Vec`.
#[derive(Debug)]
enum Group {
    One(Arc<Route>),
    Many(Box<[Arc<Route>]>),
}

impl Group {
    fn routes(&self) -> &[Arc<Route>] {
        match self {
            Group::One(route) => std::slice::from_ref(route),
            Group::Many(routes) => routes,
        }
    }

    /// The host (or suffix) that every route in the group has.
    fn key(&self) -> &str {
        self.routes()[0].host.as_ref().map_or("", HostMatch::as_str)
    }
}

// A `Group` hashes and compares as its key, so the sets can be queried with a `&str`.
impl Borrow<str> for Group {
    fn borrow(&self) -> &str {
        self.key()
    }
}

impl Hash for Group {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for Group {
    fn eq(&self, other: &Group) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Group {}

/// The first route (longest prefix first) whose prefix starts `path`.
fn find_in<'a>(routes: &'a [Arc<Route>], path: &[u8]) -> Option<&'a Arc<Route>> {
    routes
        .iter()
        .find(|route| path.starts_with(route.path.as_bytes()))
}

/// Longest prefix first; a stable sort keeps file order among equal prefix lengths (compile.rs
/// rejects exact duplicates).
fn sort_by_prefix(routes: &mut [Arc<Route>]) {
    routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
}

/// Groups `routes` (all of one kind of host match) by host into a set.
#[allow(
    clippy::mutable_key_type,
    reason = "the routes behind a Group hold atomic counters, but a group hashes only by its \
              routes' host, which never changes"
)]
fn group(mut routes: Vec<Arc<Route>>) -> FastSet<Group> {
    fn host(r: &Arc<Route>) -> &str {
        r.host.as_ref().map_or("", HostMatch::as_str)
    }
    // Stable: within a host, routes stay in file order.
    routes.sort_by(|a, b| host(a).cmp(host(b)));
    let mut set = FastSet::with_capacity_and_hasher(routes.len(), Default::default());
    let mut rest = routes.as_slice();
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|r| host(r) == host(first)).count();
        let (same, tail) = rest.split_at(n);
        rest = tail;
        let group = match same {
            [one] => Group::One(Arc::clone(one)),
            many => {
                let mut many = many.to_vec();
                sort_by_prefix(&mut many);
                Group::Many(many.into_boxed_slice())
            }
        };
        set.insert(group);
    }
    set.shrink_to_fit();
    set
}

impl Router {
    pub fn build(routes: &[Arc<Route>]) -> Router {
        let mut exact = Vec::new();
        let mut suffix = Vec::new();
        let mut any = Vec::new();
        for route in routes {
            let list = match &route.host {
                Some(HostMatch::Exact(_)) => &mut exact,
                Some(HostMatch::Suffix(_)) => &mut suffix,
                None => &mut any,
            };
            list.push(Arc::clone(route));
        }
        sort_by_prefix(&mut any);
        any.shrink_to_fit();
        Router {
            exact: group(exact),
            suffix: group(suffix),
            any,
        }
    }

    /// `host` is the request's host without port, already lower-cased by the caller (or empty);
    /// `path` is the request target's path, without the query.
    pub fn find(&self, host: &str, path: &[u8]) -> Option<&Arc<Route>> {
        if !host.is_empty() {
            if let Some(route) = self.exact.get(host).and_then(|g| find_in(g.routes(), path)) {
                return Some(route);
            }
            if !self.suffix.is_empty() {
                // Try `.b.c` then `.c` for host `a.b.c`: the longest suffix first.
                let mut rest = host;
                while let Some(dot) = rest.find('.') {
                    let suffix = &rest[dot..];
                    if let Some(route) = self
                        .suffix
                        .get(suffix)
                        .and_then(|g| find_in(g.routes(), path))
                    {
                        return Some(route);
                    }
                    rest = &rest[dot + 1..];
                }
            }
        }
        find_in(&self.any, path)
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
            path: path.into(),
            action: RouteAction::Respond(Box::new(FixedResponse {
                status: 200,
                body: bytes::Bytes::new(),
                content_type: "text/plain".into(),
            })),
            max_body_bytes: 0,
            client_body_timeout: Duration::from_secs(1),
            retry_with_body: false,
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
