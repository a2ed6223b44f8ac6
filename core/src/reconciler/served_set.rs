//! The versions served now, by plugin id, with an index of their route patterns by shape.
//!
//! A publish asks which served patterns overlap its own. Scanning every served route made that
//! O(routes) per publish, and a start of N plugins O(N²) (1,000 plugins of 10 routes: 50 million
//! comparisons). Two patterns overlap only if they have as many segments and their first
//! segments agree (equal literals, or a parameter on either side), so the index keys patterns by
//! (segment count, first literal) and a publish looks at two buckets per route of its own.

use crate::routes::Pattern;
use std::collections::{BTreeMap, HashMap};

/// Where patterns are filed: (segment count, first segment if it is a literal).
type Key = (usize, Option<String>);

/// What the set holds: something serving these patterns.
pub(super) trait Routed {
    fn patterns(&self) -> &[Pattern];
}

pub(super) struct ServedSet<T> {
    by_id: BTreeMap<i64, T>,
    /// Every served pattern, as (plugin id, index into its `patterns`), by [`Key`].
    index: HashMap<Key, Vec<(i64, usize)>>,
}

fn key(p: &Pattern) -> Key {
    let mut segments = p.segments();
    let first = segments.next().flatten().map(str::to_string);
    (p.segments().count(), first)
}

impl<T> Default for ServedSet<T> {
    fn default() -> Self {
        Self { by_id: BTreeMap::new(), index: HashMap::new() }
    }
}

impl<T: Routed> ServedSet<T> {
    pub fn get(&self, id: &i64) -> Option<&T> {
        self.by_id.get(id)
    }

    /// Mutable access to what does not change the index (its config).
    pub fn get_mut(&mut self, id: &i64) -> Option<&mut T> {
        self.by_id.get_mut(id)
    }

    pub fn contains_key(&self, id: &i64) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn keys(&self) -> impl Iterator<Item = &i64> {
        self.by_id.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.by_id.values()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn insert(&mut self, id: i64, served: T) -> Option<T> {
        let previous = self.remove(&id);
        for (i, p) in served.patterns().iter().enumerate() {
            self.index.entry(key(p)).or_default().push((id, i));
        }
        self.by_id.insert(id, served);
        previous
    }

    pub fn remove(&mut self, id: &i64) -> Option<T> {
        let served = self.by_id.remove(id)?;
        for p in served.patterns() {
            let k = key(p);
            if let Some(bucket) = self.index.get_mut(&k) {
                bucket.retain(|(owner, _)| owner != id);
                if bucket.is_empty() {
                    self.index.remove(&k);
                }
            }
        }
        Some(served)
    }

    /// Everything, leaving the set empty.
    pub fn take_all(&mut self) -> BTreeMap<i64, T> {
        self.index.clear();
        std::mem::take(&mut self.by_id)
    }

    /// The served patterns that overlap `p`, with their plugin's id, in no particular order.
    pub fn overlapping<'a>(&'a self, p: &'a Pattern) -> impl Iterator<Item = (i64, &'a Pattern)> + 'a {
        let (len, first) = key(p);
        let buckets: Vec<&Vec<(i64, usize)>> = match first {
            // A parameter first: any first segment of the same length.
            None => self.index.iter().filter(|((l, _), _)| *l == len).map(|(_, b)| b).collect(),
            Some(lit) => {
                [self.index.get(&(len, Some(lit))), self.index.get(&(len, None))].into_iter().flatten().collect()
            }
        };
        buckets
            .into_iter()
            .flatten()
            .map(|&(id, i)| (id, &self.by_id[&id].patterns()[i]))
            .filter(move |(_, theirs)| theirs.overlaps(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Paths(Vec<Pattern>);

    impl Routed for Paths {
        fn patterns(&self) -> &[Pattern] {
            &self.0
        }
    }

    fn paths(ps: &[&str]) -> Paths {
        Paths(ps.iter().map(|p| Pattern::parse(p).unwrap()).collect())
    }

    /// Whether the index answers exactly what a scan of every served pattern answers.
    #[test]
    fn the_index_finds_what_a_full_scan_finds() {
        let sets: [&[&str]; 4] =
            [&["/a/b", "/a/{x}", "/c"], &["/{y}/b", "/a/b/c"], &["/d/{z}/e", "/{p}/{q}/e"], &["/c/d"]];
        let mut set = ServedSet::default();
        for (id, set_paths) in sets.iter().enumerate() {
            set.insert(id as i64, paths(set_paths));
        }
        set.remove(&3);
        set.insert(1, paths(&["/{y}/b", "/a/b/c", "/e"])); // replaced: old entries gone
        let probes = ["/a/b", "/a/{k}", "/{k}/b", "/c", "/{k}", "/x/y/e", "/c/d", "/e", "/a/b/c", "/{a}/{b}/{c}"];
        for probe in probes {
            let probe = Pattern::parse(probe).unwrap();
            let mut indexed: Vec<(i64, String)> = set.overlapping(&probe).map(|(id, p)| (id, p.to_string())).collect();
            let mut scanned: Vec<(i64, String)> = set
                .by_id
                .iter()
                .flat_map(|(id, s)| s.0.iter().filter(|p| p.overlaps(&probe)).map(|p| (*id, p.to_string())))
                .collect();
            indexed.sort();
            scanned.sort();
            assert_eq!(indexed, scanned, "{probe}");
        }
        assert!(set.overlapping(&Pattern::parse("/c/d").unwrap()).next().is_none(), "plugin 3 was removed");
        set.take_all();
        assert!(set.index.is_empty());
    }
}
