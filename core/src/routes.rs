//! Route patterns of plugins: parsing, conflicts, and the one place where OpenAPI-style paths
//! (`/items/{id}`) become poem-style paths (`/items/:id`).
//!
//! A path belongs to one owner. Two patterns *overlap* when some request path matches both
//! (segment by segment, a parameter matches anything); a plugin whose pattern overlaps another
//! plugin's, or the admin API's, is refused, whatever the methods.

use crate::loader::LoadedPlugin;
use std::fmt;
use std::sync::Arc;

/// Where the reconciler publishes the set of served plugin versions (the HTTP layer's router).
/// `publish` replaces the whole set at once: a request sees the old set or the new one, never a mix.
pub trait RouteSink: Send + Sync {
    /// Whether this plugin's routes (and what else the sink takes from it) can be served, on
    /// their own. A set of plugins that each pass and whose paths do not overlap is never
    /// refused by [`RouteSink::publish`].
    fn check(&self, plugin: &Arc<LoadedPlugin>) -> Result<(), String>;

    /// Serves exactly these plugins' routes from now on. An error leaves the previous set serving.
    fn publish(&self, plugins: &[Arc<LoadedPlugin>]) -> Result<(), String>;
}

/// Publishes to the route table and then, once the table took it, to the event bus (whose
/// subscriptions follow what serves).
pub struct Fanout<R> {
    pub routes: Arc<R>,
    pub events: Arc<crate::events::EventBus>,
}

impl<R: RouteSink> RouteSink for Fanout<R> {
    fn check(&self, plugin: &Arc<LoadedPlugin>) -> Result<(), String> {
        for s in &plugin.description().subscriptions {
            crate::events::topic::check(&s.pattern, true)
                .map_err(|e| format!("{}: event subscription {}: {e}", plugin.description().name, s.handler))?;
        }
        self.routes.check(plugin)
    }

    fn publish(&self, plugins: &[Arc<LoadedPlugin>]) -> Result<(), String> {
        self.routes.publish(plugins)?;
        self.events.serve(plugins);
        Ok(())
    }
}

/// Why a plugin's own routes cannot be served, whatever other plugins serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteProblem {
    /// A malformed pattern, or a method and path declared twice (`InvalidRoute`).
    Invalid(String),
    /// A path of the admin API (`RouteConflict`).
    Conflict(String),
}

/// A plugin's routes as (method, pattern), if they are sound on their own.
pub fn own_patterns(routes: &[kiln_types::RouteDescription]) -> Result<Vec<(&str, Pattern)>, RouteProblem> {
    let mut mine: Vec<(&str, Pattern)> = Vec::new();
    for r in routes {
        let p = Pattern::parse(&r.path).map_err(RouteProblem::Invalid)?;
        if let Some(why) = p.admin_conflict() {
            return Err(RouteProblem::Conflict(why));
        }
        if mine.iter().any(|(m, q)| *m == r.method && *q == p) {
            return Err(RouteProblem::Invalid(format!("{} {} is declared twice", r.method, r.path)));
        }
        mine.push((r.method.as_str(), p));
    }
    Ok(mine)
}

/// Paths the admin API serves, as patterns.
pub const ADMIN_PATHS: &[&str] = &[
    "/plugins",
    "/plugins/{name}",
    "/plugins/{name}/reload",
    "/plugins/{name}/toggle",
    "/plugins/{name}/endpoints",
    "/plugins/{name}/config",
    "/plugins/{name}/builds",
    "/plugins/{name}/logs",
    "/plugins/{name}/load",
    "/plugins/install",
    "/plugins/discover",
    "/events",
    "/events/{topic}",
    "/replicas",
    "/catalog",
    "/catalog/sources",
    "/catalog/sync",
    "/catalog/{name}/install",
    "/health",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth-receiver.html",
    "/admin",
    "/admin/app.js",
    "/admin/app.css",
];

/// First path segments kept for the admin API, now and later.
pub const ADMIN_ROOTS: &[&str] =
    &["plugins", "events", "replicas", "catalog", "health", "metrics", "openapi.json", "docs", "admin"];

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A parsed route pattern such as `/powertable/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    segments: Vec<Segment>,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Pattern {
    /// Parses an OpenAPI-style path: `/` then segments of literal text or one whole `{param}`.
    pub fn parse(path: &str) -> Result<Self, String> {
        let rest = path.strip_prefix('/').ok_or_else(|| format!("path {path:?} must start with '/'"))?;
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for seg in rest.split('/') {
                segments.push(parse_segment(path, seg)?);
            }
        }
        let mut names: Vec<&str> =
            segments.iter().filter_map(|s| if let Segment::Param(p) = s { Some(p.as_str()) } else { None }).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!("path {path:?} names a parameter twice"));
        }
        Ok(Self { source: path.to_string(), segments })
    }

    /// Its segments: `Some(literal)`, or `None` for a parameter.
    pub fn segments(&self) -> impl Iterator<Item = Option<&str>> {
        self.segments.iter().map(|s| match s {
            Segment::Literal(l) => Some(l.as_str()),
            Segment::Param(_) => None,
        })
    }

    /// Names of the path parameters, in order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| if let Segment::Param(p) = s { Some(p.as_str()) } else { None })
    }

    /// Whether some request path matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        self.segments.len() == other.segments.len()
            && self.segments.iter().zip(&other.segments).all(|pair| match pair {
                (Segment::Literal(a), Segment::Literal(b)) => a == b,
                _ => true,
            })
    }

    /// Whether the request path `path` matches this pattern.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else { return false };
        let parts: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split('/').collect() };
        parts.len() == self.segments.len()
            && self.segments.iter().zip(parts).all(|(s, p)| match s {
                Segment::Literal(l) => l == p,
                Segment::Param(_) => !p.is_empty(),
            })
    }

    /// Why this pattern may not be used by a plugin, if it clashes with the admin API.
    pub fn admin_conflict(&self) -> Option<String> {
        if let Some(Segment::Literal(first)) = self.segments.first()
            && ADMIN_ROOTS.contains(&first.as_str())
        {
            return Some(format!("path {self} is under /{first}, which is reserved for kiln's admin API"));
        }
        if self.segments.is_empty() {
            return Some("path / is reserved".into());
        }
        ADMIN_PATHS
            .iter()
            .map(|p| Pattern::parse(p).expect("admin paths are valid"))
            .find(|admin| self.overlaps(admin))
            .map(|admin| format!("path {self} overlaps kiln's admin endpoint {admin}"))
    }
}

fn parse_segment(path: &str, seg: &str) -> Result<Segment, String> {
    if seg.is_empty() {
        return Err(format!("path {path:?} has an empty segment"));
    }
    if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        return if ok { Ok(Segment::Param(name.into())) } else { Err(format!("path {path:?}: bad parameter {seg:?}")) };
    }
    // `<` `>`, spaces and control characters never reach a route: a request path cannot hold them.
    if seg == "."
        || seg == ".."
        || seg.contains(['{', '}', ':', '*', '?', '#', '%', '<', '>'])
        || seg.contains(|c: char| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err(format!("path {path:?}: segment {seg:?} is not allowed (use {{name}} for a parameter)"));
    }
    Ok(Segment::Literal(seg.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn names_its_segments_and_parameters() {
        assert_eq!(p("/powertable/{id}").segments().collect::<Vec<_>>(), [Some("powertable"), None]);
        assert_eq!(p("/").segments().count(), 0);
        assert_eq!(p("/a/{x}/c/{y}").params().collect::<Vec<_>>(), ["x", "y"]);
    }

    #[test]
    fn rejects_bad_paths() {
        for bad in
            ["", "x", "/a//b", "/a/{}", "/a/{1x}", "/a/:id", "/a/*", "/a/..", "/{x}/{x}", "/v<1>", "/a b", "/a\tb"]
        {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_paths_match_segment_wise() {
        let p = Pattern::parse("/plugins/{name}/config").unwrap();
        assert!(p.matches("/plugins/hello/config"));
        assert!(!p.matches("/plugins//config") && !p.matches("/plugins/hello") && !p.matches("/plugins/a/b/config"));
        assert!(Pattern::parse("/health").unwrap().matches("/health"));
    }

    #[test]
    fn overlap_is_segment_wise() {
        assert!(p("/a/{id}").overlaps(&p("/a/list")));
        assert!(p("/a/{id}").overlaps(&p("/{x}/b")));
        assert!(!p("/a/{id}").overlaps(&p("/a")));
        assert!(!p("/a/b").overlaps(&p("/a/c")));
    }

    #[test]
    fn admin_paths_are_protected() {
        assert!(p("/plugins/x").admin_conflict().is_some());
        assert!(p("/docs").admin_conflict().is_some());
        assert!(p("/{anything}").admin_conflict().is_some());
        assert!(p("/{a}/reload").admin_conflict().is_some(), "/plugins/reload matches both");
        assert!(p("/{a}/b/c/d").admin_conflict().is_none());
        assert!(p("/powertable/{id}").admin_conflict().is_none());
    }
}
