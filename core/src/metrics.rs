//! kiln's metrics, served at `GET /metrics` in the Prometheus text format.
//!
//! One registry per server (tests run several servers in one process). Labels are bounded: a
//! plugin's name, its route *patterns* (`GET /notes/:id`, never a request's path), a status
//! class, a result. Each plugin endpoint holds its route's handles, made at their first use, so
//! a request costs a few atomic adds, not a label lookup.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Seconds, from 100 µs to 10 s: handlers, loads and passes.
const FAST: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Seconds, from 50 ms to 10 minutes: builds.
const SLOW: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    in_flight: IntGaugeVec,
    request_seconds: HistogramVec,
    panics: IntCounterVec,
    timeouts: IntCounterVec,
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
    events_published: IntCounter,
    /// The route labels handed out per plugin, so that an uninstalled plugin's series go.
    routes: Mutex<HashMap<String, HashSet<String>>>,
}

/// The handles one plugin route counts its requests with, each made at its first use: a route
/// never requested (most of a thousand plugins' ten thousand routes) has no series and costs
/// no memory in the registry.
pub struct RouteMetrics {
    metrics: Arc<Metrics>,
    plugin: Arc<str>,
    route: Arc<str>,
    /// Responses by status class: 1xx … 5xx.
    classes: [OnceLock<IntCounter>; 5],
    seconds: OnceLock<Histogram>,
    in_flight: OnceLock<IntGauge>,
    panics: OnceLock<IntCounter>,
    timeouts: OnceLock<IntCounter>,
}

/// A request being answered, counted in `kiln_plugin_requests_in_flight` until it is dropped
/// (answered, or given up when its client leaves).
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl RouteMetrics {
    /// A request starts.
    pub fn enter(&self) -> InFlight {
        let gauge = self.in_flight.get_or_init(|| self.metrics.in_flight.with_label_values(&[&*self.plugin])).clone();
        gauge.inc();
        InFlight(gauge)
    }

    /// A request answered `status` after `took`.
    pub fn answered(&self, status: u16, took: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        let m = &self.metrics;
        let labels = [&*self.plugin, &*self.route, CLASSES[class]];
        self.classes[class].get_or_init(|| m.requests.with_label_values(&labels)).inc();
        let labels = [&*self.plugin, &*self.route];
        self.seconds.get_or_init(|| m.request_seconds.with_label_values(&labels)).observe(took.as_secs_f64());
    }

    pub fn panicked(&self) {
        self.panics.get_or_init(|| self.metrics.panics.with_label_values(&[&*self.plugin])).inc();
    }

    pub fn timed_out(&self) {
        self.timeouts.get_or_init(|| self.metrics.timeouts.with_label_values(&[&*self.plugin])).inc();
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
            requests: counter_vec(
                &registry,
                "kiln_plugin_requests_total",
                "Requests answered by plugin routes, by plugin, route pattern and status class.",
                &["plugin", "route", "class"],
            ),
            in_flight: {
                let opts =
                    Opts::new("kiln_plugin_requests_in_flight", "Requests plugin routes are answering now, by plugin.");
                let g = IntGaugeVec::new(opts, &["plugin"]).expect("valid metric");
                registry.register(Box::new(g.clone())).expect("registered once");
                g
            },
            request_seconds: histogram_vec(
                &registry,
                "kiln_plugin_request_duration_seconds",
                "Time to answer a plugin route's request, body read included.",
                FAST,
                &["plugin", "route"],
            ),
            panics: counter_vec(&registry, "kiln_plugin_panics_total", "Handler panics, by plugin.", &["plugin"]),
            timeouts: counter_vec(
                &registry,
                "kiln_plugin_timeouts_total",
                "Requests answered 504 because the handler ran past its deadline, by plugin.",
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
            events_published: counter("kiln_events_published_total", "Events published on the bus."),
            routes: Default::default(),
            registry,
        }
    }

    /// The handles of one route of one plugin. The route label is `METHOD /path` with
    /// parameters written `:name` (`{name}` in a label value is valid, but simple text-format
    /// parsers that scan for the closing brace of the label set cut the line there).
    pub fn route(self: &Arc<Self>, plugin: &str, method: &str, path: &str) -> RouteMetrics {
        let route = format!("{method} {}", path.replace('{', ":").replace('}', ""));
        self.routes.lock().expect("routes lock").entry(plugin.to_string()).or_default().insert(route.clone());
        RouteMetrics {
            metrics: self.clone(),
            plugin: plugin.into(),
            route: route.into(),
            classes: Default::default(),
            seconds: OnceLock::new(),
            in_flight: OnceLock::new(),
            panics: OnceLock::new(),
            timeouts: OnceLock::new(),
        }
    }

    /// Plugin `plugin` was uninstalled: its series go (label sets stay bounded over time).
    pub fn forget(&self, plugin: &str) {
        let routes = self.routes.lock().expect("routes lock").remove(plugin).unwrap_or_default();
        for route in &routes {
            for class in CLASSES {
                let _ = self.requests.remove_label_values(&[plugin, route, class]);
            }
            let _ = self.request_seconds.remove_label_values(&[plugin, route]);
        }
        for per_plugin in [&self.panics, &self.timeouts, &self.crashes] {
            let _ = per_plugin.remove_label_values(&[plugin]);
        }
        let _ = self.in_flight.remove_label_values(&[plugin]);
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
