//! The plugin path table: a trie of path segments, made anew on every change of what serves
//! from the branches of the previous one that did not change.
//!
//! poem's `Route` would do the matching, but adding a path to it compiles a regex
//! (`normalize_path`), about 20 µs a route: a publish of 10,000 routes took 0.2 s, and a warm
//! start of 50 plugins spent most of its time there (one rebuild per plugin). Building this
//! trie costs a few hash-map inserts per route.
//!
//! Matching is poem's: segment by segment, a literal segment is tried before a parameter, and
//! the search backs up when the literal branch finds no route (`/items/top` beats
//! `/items/{id}`, and `/items/{id}/x` is still found for `/items/top/x`). Unlike poem, a
//! parameter matches one *non-empty* segment (as the test kit does). Paths are matched as sent;
//! the endpoint percent-decodes the parameters' values.

use crate::routes::Pattern;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Paths to values of type `T` (the endpoints of one path).
///
/// Branches are shared between routers: [`PathRouter::rebuilt`] makes a router that shares
/// every branch under a first segment it was not asked to rebuild, so a change of one plugin
/// costs its own routes, not everybody's.
pub struct PathRouter<T> {
    root: Node<T>,
}

struct Node<T> {
    literals: HashMap<Box<str>, Arc<Node<T>>>,
    param: Option<Arc<Node<T>>>,
    value: Option<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self { literals: HashMap::new(), param: None, value: None }
    }
}

impl<T> Default for PathRouter<T> {
    fn default() -> Self {
        Self { root: Node::default() }
    }
}

/// The branch of the router a pattern lies in: its first segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum First {
    /// `/` itself.
    Root,
    Literal(Box<str>),
    Param,
}

impl First {
    pub fn of(pattern: &Pattern) -> Self {
        match pattern.segments().next() {
            None => Self::Root,
            Some(Some(literal)) => Self::Literal(literal.into()),
            Some(None) => Self::Param,
        }
    }
}

/// Where each path parameter's value lies in the request path (byte ranges), in order.
pub type ParamSpans = Vec<(usize, usize)>;

impl<T> PathRouter<T> {
    /// Adds `value` at `pattern`. Fails if a pattern of the same shape (the same literals,
    /// parameters at the same places) is there already, or if its branch is shared with
    /// another router (see [`PathRouter::rebuilt`]).
    pub fn insert(&mut self, pattern: &Pattern, value: T) -> Result<(), String> {
        let mut node = &mut self.root;
        for segment in pattern.segments() {
            let child = match segment {
                Some(literal) => node.literals.entry(literal.into()).or_default(),
                None => node.param.get_or_insert_with(Default::default),
            };
            node = Arc::get_mut(child).ok_or_else(|| format!("path {pattern}: its branch is not being rebuilt"))?;
        }
        if node.value.is_some() {
            return Err(format!("path {pattern} is served twice"));
        }
        node.value = Some(value);
        Ok(())
    }

    /// The value for request path `path` (as sent: not decoded), and where its parameters are.
    pub fn find(&self, path: &str) -> Option<(&T, ParamSpans)> {
        let rest = path.strip_prefix('/')?;
        let mut spans = Vec::new();
        let value = if rest.is_empty() { self.root.value.as_ref() } else { find(&self.root, rest, 1, &mut spans) }?;
        Some((value, spans))
    }
}

impl<T: Clone> PathRouter<T> {
    /// This router with the branches under `firsts` replaced by `routes`, whose patterns must
    /// all lie under `firsts`. Every other branch is shared, not copied.
    pub fn rebuilt<'a>(
        &self,
        firsts: &HashSet<First>,
        routes: impl IntoIterator<Item = (&'a Pattern, T)>,
    ) -> Result<Self, String> {
        let mut root = Node {
            literals: self.root.literals.clone(),
            param: self.root.param.clone(),
            value: self.root.value.clone(),
        };
        for first in firsts {
            match first {
                First::Root => root.value = None,
                First::Literal(literal) => drop(root.literals.remove(literal)),
                First::Param => root.param = None,
            }
        }
        let mut router = Self { root };
        for (pattern, value) in routes {
            if !firsts.contains(&First::of(pattern)) {
                return Err(format!("path {pattern} is not under a branch being rebuilt"));
            }
            router.insert(pattern, value)?;
        }
        Ok(router)
    }
}

/// The value under `node` for `rest` (the path after a `/`, starting at byte `at` of it).
fn find<'a, T>(node: &'a Node<T>, rest: &str, at: usize, spans: &mut ParamSpans) -> Option<&'a T> {
    let (segment, next) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let below = |child: &'a Node<T>, spans: &mut ParamSpans| match next {
        None => child.value.as_ref(),
        Some(next) => find(child, next, at + segment.len() + 1, spans),
    };
    if let Some(child) = node.literals.get(segment)
        && let Some(value) = below(child, spans)
    {
        return Some(value);
    }
    if let Some(child) = &node.param
        && !segment.is_empty()
    {
        spans.push((at, at + segment.len()));
        if let Some(value) = below(child, spans) {
            return Some(value);
        }
        spans.pop();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(paths: &[&str]) -> PathRouter<String> {
        let mut r = PathRouter::default();
        for p in paths {
            r.insert(&Pattern::parse(p).unwrap(), p.to_string()).unwrap();
        }
        r
    }

    fn found(r: &PathRouter<String>, path: &str) -> Option<(String, Vec<String>)> {
        r.find(path).map(|(v, spans)| (v.clone(), spans.iter().map(|&(s, e)| path[s..e].to_string()).collect()))
    }

    #[test]
    fn literals_beat_parameters_and_the_search_backs_up() {
        let r = router(&["/items", "/items/top", "/items/{id}", "/items/{id}/x", "/", "/a/{b}/{c}"]);
        assert_eq!(found(&r, "/items"), Some(("/items".into(), vec![])));
        assert_eq!(found(&r, "/items/top"), Some(("/items/top".into(), vec![])));
        assert_eq!(found(&r, "/items/7"), Some(("/items/{id}".into(), vec!["7".into()])));
        assert_eq!(found(&r, "/items/top/x"), Some(("/items/{id}/x".into(), vec!["top".into()])));
        assert_eq!(found(&r, "/a/b%20c/d"), Some(("/a/{b}/{c}".into(), vec!["b%20c".into(), "d".into()])));
        assert_eq!(found(&r, "/"), Some(("/".into(), vec![])));
    }

    #[test]
    fn what_no_pattern_takes_is_not_found() {
        let r = router(&["/items", "/items/{id}"]);
        for path in ["/items/", "/items//", "//items", "/items/7/", "/other", "", "items", "/items/7/8"] {
            assert_eq!(found(&r, path), None, "{path:?}");
        }
    }

    #[test]
    fn a_rebuilt_router_shares_what_it_was_not_asked_to_rebuild() {
        let r = router(&["/a/x", "/a/{id}", "/b", "/{p}/c"]);
        let firsts: HashSet<First> = [First::Literal("a".into()), First::Literal("d".into())].into();
        let (ay, d) = (Pattern::parse("/a/y").unwrap(), Pattern::parse("/d").unwrap());
        let r2 = r.rebuilt(&firsts, [(&ay, "/a/y".to_string()), (&d, "/d".to_string())]).unwrap();
        assert_eq!(found(&r2, "/a/y").map(|f| f.0), Some("/a/y".into()));
        assert_eq!(found(&r2, "/a/x"), None, "the branch under /a was replaced");
        assert_eq!(found(&r2, "/b").map(|f| f.0), Some("/b".into()));
        assert_eq!(found(&r2, "/d").map(|f| f.0), Some("/d".into()));
        assert_eq!(found(&r2, "/q/c").map(|f| f.0), Some("/{p}/c".into()));
        assert_eq!(found(&r, "/a/x").map(|f| f.0), Some("/a/x".into()), "the old router is untouched");
        assert!(Arc::ptr_eq(&r.root.literals["b"], &r2.root.literals["b"]), "/b is shared");
        let b = Pattern::parse("/b/more").unwrap();
        assert!(r.rebuilt(&firsts, [(&b, "x".to_string())]).is_err(), "outside the branches named");
        let param: HashSet<First> = [First::Param].into();
        let r3 = r.rebuilt(&param, []).unwrap();
        assert_eq!(found(&r3, "/q/c"), None);
        assert_eq!(found(&r3, "/a/q").map(|f| f.0), Some("/a/{id}".into()));
    }

    #[test]
    fn a_shape_served_twice_is_refused() {
        let mut r = router(&["/items/{id}"]);
        assert!(r.insert(&Pattern::parse("/items/{name}").unwrap(), "again".into()).is_err());
        assert!(r.insert(&Pattern::parse("/items/{id}/x").unwrap(), "deeper".into()).is_ok());
    }
}
