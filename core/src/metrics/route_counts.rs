//! The per-request metrics of plugin routes, counted without shared writes.
//!
//! Every plugin request counts itself: in flight, then answered (a status class, a latency
//! bucket). With prometheus's own counter, gauge and histogram that was nine atomic writes to
//! cache lines every worker shares (the histogram alone takes four, the gauge's handle an `Arc`
//! clone), and on two cores under load each such line moves between the cores on nearly every
//! request: 3% of the server's CPU per request (`bench/run`, section `metrics`). Here each
//! route's counts are split into shards, one per thread as far as the shard count goes, each on
//! cache lines of its own: a request writes only its thread's shard, uncontended. A scrape sums
//! the shards.
//!
//! A scrape reads while requests count, so a route's histogram may miss a request that is
//! being counted; its count is the sum of its buckets, so the two always agree.

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Latency bucket bounds, seconds, from 100 µs to 10 s.
pub(super) const BOUNDS: [f64; 15] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Status classes, by a status's first digit.
pub(super) const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

const REQUESTS: &str = "kiln_plugin_requests_total";
const IN_FLIGHT: &str = "kiln_plugin_requests_in_flight";
const SECONDS: &str = "kiln_plugin_request_duration_seconds";

/// One thread's counts of one route, on cache lines no other shard shares (128 bytes: a pair
/// of lines, which some CPUs fetch together).
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    classes: [AtomicU64; 5],
    /// Requests by latency bucket (not cumulative); the last is past every bound.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    nanos: AtomicU64,
    /// Requests that entered here less those that left here (a request may leave on another
    /// thread's shard: only the sum over the shards means anything).
    in_flight: AtomicI64,
}

/// The shards a thread may use, as a mask (a power of two, less one).
fn shard_mask() -> usize {
    static MASK: OnceLock<usize> = OnceLock::new();
    *MASK.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores * 2).next_power_of_two().min(16) - 1
    })
}

/// This thread's shard, the same for every route: threads are numbered as they first count.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i) & shard_mask()
}

/// One route's counts: its shards, made at its first request (a route never requested, like
/// most of a thousand plugins' routes, costs no more than its entry).
#[derive(Default)]
pub(super) struct RouteCounts {
    shards: OnceLock<Box<[Shard]>>,
}

impl RouteCounts {
    fn mine(&self) -> &Shard {
        let shards = self.shards.get_or_init(|| (0..=shard_mask()).map(|_| Shard::default()).collect());
        &shards[shard_index()]
    }

    pub(super) fn enter(&self) {
        self.mine().in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn leave(&self) {
        self.mine().in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn answered(&self, status: u16, took: Duration) {
        let shard = self.mine();
        let class = (status / 100).clamp(1, 5) as usize - 1;
        shard.classes[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = BOUNDS.iter().position(|b| secs <= *b).unwrap_or(BOUNDS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.nanos.fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// The sums over the shards, if the route was ever requested.
    fn sum(&self) -> Option<Sum> {
        let shards = self.shards.get()?;
        let mut sum = Sum::default();
        for shard in shards.iter() {
            for (total, c) in sum.classes.iter_mut().zip(&shard.classes) {
                *total += c.load(Ordering::Relaxed);
            }
            for (total, b) in sum.buckets.iter_mut().zip(&shard.buckets) {
                *total += b.load(Ordering::Relaxed);
            }
            sum.nanos += shard.nanos.load(Ordering::Relaxed);
            sum.in_flight += shard.in_flight.load(Ordering::Relaxed);
        }
        Some(sum)
    }
}

#[derive(Default)]
struct Sum {
    classes: [u64; 5],
    buckets: [u64; BOUNDS.len() + 1],
    nanos: u64,
    in_flight: i64,
}

/// Every plugin route's counts, by plugin and route label, and the three metric families made
/// of them at a scrape.
pub(super) struct RouteFamilies {
    routes: Mutex<BTreeMap<String, BTreeMap<String, Arc<RouteCounts>>>>,
    descs: [Desc; 3],
}

impl RouteFamilies {
    pub(super) fn new() -> Self {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            let labels = labels.iter().map(|l| l.to_string()).collect();
            Desc::new(name.into(), help.into(), labels, Default::default()).expect("valid metric")
        };
        Self {
            routes: Default::default(),
            descs: [
                desc(
                    REQUESTS,
                    "Requests answered by plugin routes, by plugin, route pattern and status class.",
                    &["plugin", "route", "class"],
                ),
                desc(IN_FLIGHT, "Requests plugin routes are answering now, by plugin.", &["plugin"]),
                desc(SECONDS, "Time to answer a plugin route's request, body read included.", &["plugin", "route"]),
            ],
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, Arc<RouteCounts>>>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counts of `route` of `plugin`: the same for every instance of the plugin, so that a
    /// reload keeps counting where the last version left off.
    pub(super) fn route(&self, plugin: &str, route: &str) -> Arc<RouteCounts> {
        let mut routes = self.lock();
        let of_plugin = routes.entry(plugin.to_string()).or_default();
        of_plugin.entry(route.to_string()).or_default().clone()
    }

    /// `plugin`'s series go (it was uninstalled).
    pub(super) fn forget(&self, plugin: &str) {
        self.lock().remove(plugin);
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    (pairs.iter())
        .map(|(name, value)| {
            let mut pair = proto::LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect()
}

fn family(desc: &Desc, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

impl Collector for RouteFamilies {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (mut requests, mut in_flight, mut seconds) = (Vec::new(), Vec::new(), Vec::new());
        for (plugin, routes) in self.lock().iter() {
            let mut plugin_in_flight = None;
            for (route, counts) in routes {
                let Some(sum) = counts.sum() else { continue };
                *plugin_in_flight.get_or_insert(0) += sum.in_flight;
                for (class, &n) in CLASSES.iter().zip(&sum.classes) {
                    if n > 0 {
                        let mut counter = proto::Counter::default();
                        counter.set_value(n as f64);
                        let mut m = proto::Metric::from_label(labels(&[
                            ("class", class),
                            ("plugin", plugin),
                            ("route", route),
                        ]));
                        m.set_counter(counter);
                        requests.push(m);
                    }
                }
                let mut cumulative = 0;
                let buckets = (BOUNDS.iter().zip(&sum.buckets))
                    .map(|(&bound, &n)| {
                        cumulative += n;
                        let mut bucket = proto::Bucket::default();
                        bucket.set_upper_bound(bound);
                        bucket.set_cumulative_count(cumulative);
                        bucket
                    })
                    .collect();
                let mut histogram = proto::Histogram::default();
                histogram.set_sample_count(sum.buckets.iter().sum());
                histogram.set_sample_sum(sum.nanos as f64 / 1e9);
                histogram.set_bucket(buckets);
                let mut m = proto::Metric::from_label(labels(&[("plugin", plugin), ("route", route)]));
                m.set_histogram(histogram);
                seconds.push(m);
            }
            if let Some(n) = plugin_in_flight {
                let mut gauge = proto::Gauge::default();
                gauge.set_value(n as f64);
                let mut m = proto::Metric::from_label(labels(&[("plugin", plugin)]));
                m.set_gauge(gauge);
                in_flight.push(m);
            }
        }
        let [r, i, s] = &self.descs;
        vec![
            family(r, MetricType::COUNTER, requests),
            family(i, MetricType::GAUGE, in_flight),
            family(s, MetricType::HISTOGRAM, seconds),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(families: &RouteFamilies) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families.collect(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Requests counted on many threads (more than there are shards) add up, by class and
    /// bucket; in flight is the sum over the shards even when requests leave on other threads.
    #[test]
    fn counts_from_many_threads_add_up() {
        let families = RouteFamilies::new();
        let counts = families.route("p", "GET /a");
        assert!(Arc::ptr_eq(&counts, &families.route("p", "GET /a")), "one route, one set of counts");
        let threads = 3 * (shard_mask() + 1);
        std::thread::scope(|s| {
            for t in 0..threads {
                let counts = &counts;
                s.spawn(move || {
                    for _ in 0..100 {
                        counts.enter();
                        counts.answered(if t == 0 { 500 } else { 200 }, Duration::from_micros(300));
                    }
                });
            }
        });
        // Half leave here, on this thread's shard.
        for _ in 0..(threads * 100) / 2 {
            counts.leave();
        }
        let out = text(&families);
        let ok = (threads - 1) * 100;
        assert!(out.contains(&format!("{REQUESTS}{{class=\"2xx\",plugin=\"p\",route=\"GET /a\"}} {ok}\n")), "{out}");
        assert!(out.contains(&format!("{REQUESTS}{{class=\"5xx\",plugin=\"p\",route=\"GET /a\"}} 100\n")), "{out}");
        assert!(!out.contains("class=\"4xx\""), "no series for a class never answered: {out}");
        let all = threads * 100;
        assert!(
            out.contains(&format!("{SECONDS}_bucket{{plugin=\"p\",route=\"GET /a\",le=\"0.00025\"}} 0\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{SECONDS}_bucket{{plugin=\"p\",route=\"GET /a\",le=\"0.0005\"}} {all}\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{SECONDS}_count{{plugin=\"p\",route=\"GET /a\"}} {all}\n")), "{out}");
        assert!(out.contains(&format!("{IN_FLIGHT}{{plugin=\"p\"}} {}\n", all - all / 2)), "{out}");
    }

    /// A route never requested has no series; a forgotten plugin's series go.
    #[test]
    fn unrequested_routes_and_forgotten_plugins_have_no_series() {
        let families = RouteFamilies::new();
        let _quiet = families.route("quiet", "GET /q");
        families.route("gone", "GET /g").answered(204, Duration::from_millis(2));
        families.route("kept", "GET /k").answered(404, Duration::from_secs(20));
        families.forget("gone");
        let out = text(&families);
        assert!(!out.contains("quiet") && !out.contains("gone"), "{out}");
        assert!(out.contains(&format!("{SECONDS}_bucket{{plugin=\"kept\",route=\"GET /k\",le=\"10\"}} 0\n")), "{out}");
        assert!(
            out.contains(&format!("{SECONDS}_bucket{{plugin=\"kept\",route=\"GET /k\",le=\"+Inf\"}} 1\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{SECONDS}_sum{{plugin=\"kept\",route=\"GET /k\"}} 20\n")), "{out}");
    }
}
