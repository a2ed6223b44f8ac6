//! kiln's metrics, served at `GET /metrics` in the Prometheus text format.
//!
//! One registry per server (tests run several servers in one process). Labels are bounded: a
//! plugin's name, its route *patterns* (`GET /notes/:id`, never a request's path), a status
//! class, a result. Each plugin endpoint holds its route's counts, so a request costs a few
//! uncontended atomic adds, not a label lookup (`route_counts`).

mod route_counts;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use route_counts::{RouteCounts, RouteFamilies};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Seconds, from 100 µs to 10 s: handlers, loads and passes.
const FAST: &[f64] = &route_counts::BOUNDS;
/// Seconds, from 50 ms to 10 minutes: builds.
const SLOW: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

pub struct Metrics {
    registry: Registry,
    /// Requests, in flight and their latency, by plugin route.
    routes: Arc<RouteFamilies>,
    panics: IntCounterVec,
    timeouts: IntCounterVec,
    overloaded: IntCounterVec,
    pub crashes: IntCounterVec,
    builds: IntCounterVec,
    build_seconds: Histogram,
    loads: IntCounterVec,
    load_seconds: HistogramVec,
    passes: IntCounterVec,
    pub listener_connects: IntCounter,
    /// Notification storms the listener held hints through (`crate::storm`).
    pub notify_storms: IntCounter,
    route_tables: IntCounter,
    /// Transactions that published and recorded loaded versions (`reconciler::publishing`).
    pub publish_transactions: IntCounter,
    events_published: IntCounter,
}

/// What one plugin route counts its requests with. The panic and timeout counters are made
/// at their first use: a route never requested (most of a thousand plugins' ten thousand
/// routes) adds no series.
pub struct RouteMetrics {
    metrics: Arc<Metrics>,
    plugin: Arc<str>,
    counts: Arc<RouteCounts>,
    panics: OnceLock<IntCounter>,
    timeouts: OnceLock<IntCounter>,
    overloaded: OnceLock<IntCounter>,
}

/// A request being answered, counted in `kiln_plugin_requests_in_flight` until it is dropped
/// (answered, or given up when its client leaves).
pub struct InFlight<'a>(&'a RouteCounts);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl RouteMetrics {
    /// A request starts.
    pub fn enter(&self) -> InFlight<'_> {
        self.counts.enter();
        InFlight(&self.counts)
    }

    /// A request answered `status` after `took`.
    pub fn answered(&self, status: u16, took: Duration) {
        self.counts.answered(status, took);
    }

    pub fn panicked(&self) {
        self.panics.get_or_init(|| self.metrics.panics.with_label_values(&[&*self.plugin])).inc();
    }

    pub fn timed_out(&self) {
        self.timeouts.get_or_init(|| self.metrics.timeouts.with_label_values(&[&*self.plugin])).inc();
    }

    /// A call of a blocking route found no free slot before its deadline (503).
    pub fn overloaded(&self) {
        self.overloaded.get_or_init(|| self.metrics.overloaded.with_label_values(&[&*self.plugin])).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        }
        fn histogram_vec(
            registry: &Registry,
            name: &str,
            help: &str,
            buckets: &[f64],
            labels: &[&str],
        ) -> HistogramVec {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("registered once");
            h
        }
        let build_seconds = Histogram::with_opts(
            HistogramOpts::new("kiln_build_duration_seconds", "Duration of plugin builds (cargo).")
                .buckets(SLOW.to_vec()),
        )
        .expect("valid metric");
        registry.register(Box::new(build_seconds.clone())).expect("registered once");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let listener_connects = IntCounter::new(
            "kiln_listener_connects_total",
            "Connections of the LISTEN connection (the first, and every reconnect).",
        )
        .expect("valid metric");
        registry.register(Box::new(listener_connects.clone())).expect("registered once");
        Self {
            routes: {
                let routes = Arc::new(RouteFamilies::new());
                registry.register(Box::new(SharedCollector(routes.clone()))).expect("registered once");
                routes
            },
            panics: counter_vec(&registry, "kiln_plugin_panics_total", "Handler panics, by plugin.", &["plugin"]),
            timeouts: counter_vec(
                &registry,
                "kiln_plugin_timeouts_total",
                "Requests answered 504 because the handler ran past its deadline, by plugin.",
                &["plugin"],
            ),
            overloaded: counter_vec(
                &registry,
                "kiln_plugin_overloaded_total",
                "Calls of blocking routes that found no free slot before their deadline (answered 503 PluginOverloaded), by plugin.",
                &["plugin"],
            ),
            crashes: counter_vec(
                &registry,
                "kiln_plugin_crashes_total",
                "Plugin versions found to have taken the server down while loading, and deaths of isolated plugins' processes, by plugin.",
                &["plugin"],
            ),
            builds: counter_vec(&registry, "kiln_builds_total", "Plugin builds run here, by result.", &["result"]),
            build_seconds,
            loads: counter_vec(
                &registry,
                "kiln_plugin_loads_total",
                "Plugin instances loaded (dlopen, ABI check, init), by kind (load, reload) and result.",
                &["kind", "result"],
            ),
            load_seconds: histogram_vec(
                &registry,
                "kiln_plugin_load_duration_seconds",
                "Time to load and initialize a plugin instance, by kind (load, reload).",
                FAST,
                &["kind"],
            ),
            passes: counter_vec(
                &registry,
                "kiln_reconcile_passes_total",
                "Reconcile passes, by outcome (ok, error, shutdown).",
                &["outcome"],
            ),
            listener_connects,
            notify_storms: counter(
                "kiln_notification_storms_total",
                "Storms of plugins-table notifications, during which passes were rationed (over 1,000 notifications a second).",
            ),
            route_tables: counter("kiln_route_tables_built_total", "Plugin route tables built."),
            publish_transactions: counter(
                "kiln_publish_transactions_total",
                "Transactions that published and recorded loaded plugin versions (each takes every version ready).",
            ),
            events_published: counter("kiln_events_published_total", "Events published on the bus."),
            registry,
        }
    }

    /// The handles of one route of one plugin. The route label is `METHOD /path` with
    /// parameters written `:name` (`{name}` in a label value is valid, but simple text-format
    /// parsers that scan for the closing brace of the label set cut the line there).
    pub fn route(self: &Arc<Self>, plugin: &str, method: &str, path: &str) -> RouteMetrics {
        let route = format!("{method} {}", path.replace('{', ":").replace('}', ""));
        RouteMetrics {
            metrics: self.clone(),
            plugin: plugin.into(),
            counts: self.routes.route(plugin, &route),
            panics: OnceLock::new(),
            timeouts: OnceLock::new(),
            overloaded: OnceLock::new(),
        }
    }

    /// Plugin `plugin` was uninstalled: its series go (label sets stay bounded over time).
    pub fn forget(&self, plugin: &str) {
        self.routes.forget(plugin);
        for per_plugin in [&self.panics, &self.timeouts, &self.overloaded, &self.crashes] {
            let _ = per_plugin.remove_label_values(&[plugin]);
        }
    }

    /// A build ran: how long, and whether it succeeded.
    pub fn built(&self, ok: bool, took: Duration) {
        self.builds.with_label_values(&[if ok { "success" } else { "failure" }]).inc();
        self.build_seconds.observe(took.as_secs_f64());
    }

    /// An instance was loaded (`reload`: it replaces one that serves).
    pub fn loaded(&self, reload: bool, ok: bool, took: Duration) {
        let kind = if reload { "reload" } else { "load" };
        self.loads.with_label_values(&[kind, if ok { "ok" } else { "failed" }]).inc();
        self.load_seconds.with_label_values(&[kind]).observe(took.as_secs_f64());
    }

    /// A reconcile pass ended.
    pub fn passed(&self, outcome: &str) {
        self.passes.with_label_values(&[outcome]).inc();
    }

    /// Brings the counters kept elsewhere (the reconciler's, the bus's) up to their values.
    pub fn catch_up(&self, route_tables: u64, events_published: u64) {
        for (counter, now) in [(&self.route_tables, route_tables), (&self.events_published, events_published)] {
            counter.inc_by(now.saturating_sub(counter.get()));
        }
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The route families, registered while the server keeps them too.
struct SharedCollector(Arc<RouteFamilies>);

impl prometheus::core::Collector for SharedCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}
