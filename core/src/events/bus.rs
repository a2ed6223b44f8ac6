//! The bus itself: subscribers, their queues and delivery tasks, and the recent events.

use super::topic::{self, Pattern};
use crate::host::logs::{Kind, Level, LogEntry, LogStore};
use crate::loader::LoadedPlugin;
use kiln_types::abi::RUNTIME_SUBSCRIPTION;
use serde_json::{Value, json};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Events each subscription may have queued; one more is dropped (counted).
pub const QUEUE: usize = 1024;
/// Bytes of event data (JSON text) each subscription may have queued, counted until each event's
/// turn comes: one more is dropped (counted), unless the queue is empty. Without it a slow
/// subscriber held up to [`QUEUE`] events of up to [`MAX_DATA`] each, 1 GiB.
pub const QUEUE_BYTES: usize = 32 << 20;
/// How many recent events `GET /events` can show, and how many bytes of data they may hold
/// (the oldest go first; 500 events of the largest data would hold 500 MiB).
const RECENT: usize = 500;
const RECENT_BYTES: usize = 16 << 20;
/// Largest event data, as JSON text.
pub const MAX_DATA: usize = 1 << 20;

/// Who published an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// kiln itself (`kiln.*` topics).
    Kiln,
    /// A plugin, by name.
    Plugin(String),
    /// `POST /events/{topic}`.
    Api,
    /// `pg_notify('kiln_events', …)` in some transaction.
    Postgres,
    /// A row of the `events` table, by id.
    Outbox(i64),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Kiln => f.write_str("kiln"),
            Source::Plugin(name) => write!(f, "plugin:{name}"),
            Source::Api => f.write_str("api"),
            Source::Postgres => f.write_str("postgres"),
            Source::Outbox(id) => write!(f, "outbox:{id}"),
        }
    }
}

/// The longest chain of events, each emitted by a handler of the one before, that kiln
/// publishes: a plugin that answers its own topic would otherwise loop for ever.
pub const MAX_DEPTH: u8 = 16;

thread_local! {
    /// The depth of the event this thread is delivering to a handler, while it does.
    static DELIVERING: Cell<Option<u8>> = const { Cell::new(None) };
}

/// Marks this thread as delivering an event of `depth` until dropped.
struct DepthMark(Option<u8>);

impl DepthMark {
    fn enter(depth: u8) -> Self {
        Self(DELIVERING.with(|d| d.replace(Some(depth))))
    }
}

impl Drop for DepthMark {
    fn drop(&mut self) {
        DELIVERING.with(|d| d.set(self.0));
    }
}

/// One published event, with what became of it at each subscriber.
#[derive(Debug)]
pub struct Event {
    pub id: u64,
    pub topic: String,
    /// The data, as JSON text (as plugins get it; kept as text, which is several times smaller
    /// than a parsed value).
    json: Box<str>,
    pub source: Source,
    /// How many events led to this one: 0, or one more than the event whose handler emitted it.
    pub depth: u8,
    pub at: SystemTime,
    /// How many subscriptions matched it when it was published.
    pub subscribers: std::sync::atomic::AtomicU32,
    deliveries: Mutex<Vec<Delivery>>,
    /// Told of every delivery recorded.
    settled: tokio::sync::Notify,
}

impl Event {
    /// The event's data.
    pub fn data(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or(Value::Null)
    }

    /// What became of the event at each subscriber so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, delivery: Delivery) {
        self.deliveries.lock().unwrap_or_else(|p| p.into_inner()).push(delivery);
        self.settled.notify_waiters();
    }

    /// Waits until every subscription it matched has an outcome (`false`: `patience` ran out).
    pub async fn settled(&self, patience: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let done = self.deliveries.lock().unwrap_or_else(|p| p.into_inner()).len();
            if done >= self.subscribers.load(Ordering::Relaxed) as usize {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

/// What became of an event at one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub plugin: String,
    pub handler: String,
    pub outcome: Outcome,
    /// The error, for `failed` and `timed_out`.
    pub error: Option<String>,
}

/// See [`Delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Failed,
    TimedOut,
    /// The subscriber's queue was full, or it went away before the event's turn.
    Dropped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Dropped => "dropped",
        }
    }
}

/// The counters of one subscription, for the plugin's API object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberStats {
    pub pattern: String,
    pub handler: String,
    pub delivered: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub dropped: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    dropped: AtomicU64,
    /// Bytes of data of the events queued whose turn has not come (see [`QUEUE_BYTES`]).
    queued_bytes: std::sync::atomic::AtomicUsize,
}

impl Counters {
    /// Counts `bytes` more queued, if the budget allows (an empty queue takes any event).
    fn admit(&self, bytes: usize) -> bool {
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before + bytes > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// An event admitted was not queued after all, or its turn came.
    fn release(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The recent events, oldest first, and the bytes of their data.
#[derive(Default)]
struct Recent {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
}

impl Recent {
    fn push(&mut self, event: Arc<Event>) {
        self.bytes += event.json.len();
        self.events.push_back(event);
        while self.events.len() > RECENT || (self.bytes > RECENT_BYTES && self.events.len() > 1) {
            let Some(old) = self.events.pop_front() else { break };
            self.bytes -= old.json.len();
        }
    }
}

/// One subscription of a plugin, and its queue.
struct Subscriber {
    plugin: String,
    pattern: Pattern,
    /// The declared handler's name, or `runtime#<id>`.
    handler: String,
    target: Target,
    tx: mpsc::Sender<Arc<Event>>,
    counters: Arc<Counters>,
    task: tokio::task::AbortHandle,
    /// Cleared when the subscription ends: a batch already on the blocking pool stops there.
    active: Arc<std::sync::atomic::AtomicBool>,
}

impl Subscriber {
    /// Ends the subscription: its task stops, and so does a batch of its in delivery.
    fn end(&self) {
        self.active.store(false, Ordering::SeqCst);
        self.task.abort();
    }
}

/// Where a subscription's events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// A subscription the plugin declares (`Plugin::events`): to whichever version serves.
    Declared,
    /// One an instance made at runtime (`events::on`): to that instance only, while it serves.
    Runtime { instance: usize, id: u32, once: bool },
}

/// The bus. Cheap to share (`Arc`).
pub struct EventBus {
    next_id: AtomicU64,
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
    /// The version of each plugin serving now, by name: where deliveries go.
    serving: RwLock<Arc<HashMap<String, Arc<LoadedPlugin>>>>,
    /// What was announced (`kiln.plugin.loaded`) as serving, by name: the version and its
    /// number. Announcements follow this, not each table (see [`EventBus::hold`]).
    announced: Mutex<HashMap<String, (Weak<LoadedPlugin>, String)>>,
    /// Versions published but not yet recorded: announced once they are.
    held: Mutex<Vec<Weak<LoadedPlugin>>>,
    recent: Mutex<Recent>,
    logs: Arc<LogStore>,
    /// How long a subscriber may take over one event, unless it says.
    timeout: Duration,
    runtime: tokio::runtime::Handle,
    /// Wakes the outbox worker (`NOTIFY kiln_outbox`).
    pub outbox_wake: tokio::sync::Notify,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").finish_non_exhaustive()
    }
}

impl EventBus {
    /// A bus whose delivery tasks run on the current runtime.
    pub fn new(logs: Arc<LogStore>, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            next_id: AtomicU64::new(1),
            subscribers: Default::default(),
            serving: Default::default(),
            announced: Default::default(),
            held: Default::default(),
            recent: Default::default(),
            logs,
            timeout,
            runtime: tokio::runtime::Handle::current(),
            outbox_wake: Default::default(),
        })
    }

    /// Events published since start.
    pub fn published(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed) - 1
    }

    /// Publishes an event to every matching subscriber, without waiting for any. `Err` when the
    /// topic or data is refused (a `kiln.` topic from anyone but kiln, data over [`MAX_DATA`]).
    /// Answers the event.
    pub fn publish(&self, topic: &str, data: Value, source: Source) -> Result<Arc<Event>, String> {
        topic::check(topic, false)?;
        if topic.starts_with(topic::KILN_PREFIX) && source != Source::Kiln {
            return Err(format!("{:?}: topics under {:?} are kiln's own", topic, topic::KILN_PREFIX));
        }
        // An event a handler emits is one step deeper than the event it handles.
        let depth = match (&source, DELIVERING.with(Cell::get)) {
            (Source::Plugin(_), Some(handled)) => handled.saturating_add(1),
            _ => 0,
        };
        if depth > MAX_DEPTH {
            let msg = format!(
                "{topic:?} is not published: it would end a chain of {depth} events, each emitted by a handler of the one before (at most {MAX_DEPTH}); a loop?"
            );
            if let Source::Plugin(plugin) = &source {
                tracing::warn!(plugin = %plugin, "{msg}");
            }
            return Err(msg);
        }
        let json = data.to_string();
        if json.len() > MAX_DATA {
            return Err(format!("the event's data is {} bytes of JSON; at most {MAX_DATA} are accepted", json.len()));
        }
        let event = Arc::new(Event {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            topic: topic.to_string(),
            json: json.into_boxed_str(),
            source,
            depth,
            at: SystemTime::now(),
            subscribers: Default::default(),
            deliveries: Mutex::new(Vec::new()),
            settled: Default::default(),
        });
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).push(event.clone());
        let size = event.json.len();
        let subscribers = self.subscribers.read().unwrap_or_else(|p| p.into_inner());
        for s in subscribers.iter().filter(|s| s.pattern.matches(topic)) {
            event.subscribers.fetch_add(1, Ordering::Relaxed);
            let queued = s.counters.admit(size) && {
                let sent = s.tx.try_send(event.clone()).is_ok();
                if !sent {
                    s.counters.release(size);
                }
                sent
            };
            if !queued {
                s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                event.record(Delivery {
                    plugin: s.plugin.clone(),
                    handler: s.handler.clone(),
                    outcome: Outcome::Dropped,
                    error: Some("the subscriber's queue is full".into()),
                });
                let dropped = s.counters.dropped.load(Ordering::Relaxed);
                // The first drop, and then every thousandth, so that a flood does not flood the log too.
                if dropped == 1 || dropped.is_multiple_of(1000) {
                    let msg = format!(
                        "event {} dropped: the queue of subscription {} → {} is full ({QUEUE} events or {} MiB of data; {dropped} dropped so far)",
                        event.topic,
                        s.pattern.as_str(),
                        s.handler,
                        QUEUE_BYTES >> 20
                    );
                    tracing::warn!(plugin = %s.plugin, "{msg}");
                    self.logs.push(&s.plugin, LogEntry::new(Level::Warn, Kind::Log, msg, json!({}), None));
                }
            }
        }
        Ok(event)
    }

    /// How long a subscriber may take over one event.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The most recent events, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Arc<Event>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.events.iter().rev().take(limit).cloned().collect()
    }

    /// The counters of each subscription of `plugin`.
    pub fn stats(&self, plugin: &str) -> Vec<SubscriberStats> {
        let subscribers = self.subscribers.read().unwrap_or_else(|p| p.into_inner());
        subscribers
            .iter()
            .filter(|s| s.plugin == plugin)
            .map(|s| SubscriberStats {
                pattern: s.pattern.as_str().to_string(),
                handler: s.handler.clone(),
                delivered: s.counters.delivered.load(Ordering::Relaxed),
                failed: s.counters.failed.load(Ordering::Relaxed),
                timed_out: s.counters.timed_out.load(Ordering::Relaxed),
                dropped: s.counters.dropped.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// From now on these plugins serve (the whole set, as the route table gets it): their
    /// declared subscriptions are kept or started, the others end, and kiln announces each
    /// plugin that came (`kiln.plugin.loaded`, also for a new version of one already serving)
    /// or went (`kiln.plugin.unloaded`).
    pub fn serve(self: &Arc<Self>, plugins: &[Arc<LoadedPlugin>]) {
        let now: Arc<HashMap<String, Arc<LoadedPlugin>>> =
            Arc::new(plugins.iter().map(|p| (p.description().name.clone(), p.clone())).collect());
        let before = std::mem::replace(&mut *self.serving.write().unwrap_or_else(|p| p.into_inner()), now.clone());
        {
            let mut subscribers = self.subscribers.write().unwrap_or_else(|p| p.into_inner());
            subscribers.retain(|s| {
                // Runtime subscriptions end with their instance (`forget_instance`).
                let keep = s.target != Target::Declared
                    || now.get(&s.plugin).is_some_and(|p| {
                        p.description()
                            .subscriptions
                            .iter()
                            .any(|d| d.pattern == s.pattern.as_str() && d.handler == s.handler)
                    });
                if !keep {
                    s.end();
                }
                keep
            });
            for plugin in plugins {
                let name = &plugin.description().name;
                for d in &plugin.description().subscriptions {
                    let exists = subscribers.iter().any(|s| {
                        s.target == Target::Declared
                            && &s.plugin == name
                            && s.pattern.as_str() == d.pattern
                            && s.handler == d.handler
                    });
                    if exists {
                        continue;
                    }
                    // Patterns are checked before the route table takes a plugin (`routes::Fanout`):
                    // one that is not valid here is skipped, not fatal.
                    let Ok(pattern) = Pattern::parse(&d.pattern) else { continue };
                    let timeout = d.timeout_ms.map(Duration::from_millis).unwrap_or(self.timeout);
                    subscribers.push(self.subscribe(name, pattern, &d.handler, Target::Declared, timeout));
                }
            }
        }
        drop(before);
        self.announce(&now);
    }

    /// Holds back the announcement of `plugin`, about to be published before its row is
    /// recorded: if the recording fails, the publish is undone, and nothing was announced.
    /// [`EventBus::release`] ends the hold.
    pub fn hold(&self, plugin: &Arc<LoadedPlugin>) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(plugin));
    }

    /// Ends the hold on `plugins`: recorded, each is announced if it serves.
    pub fn release(&self, plugins: &[&Arc<LoadedPlugin>]) {
        let released: std::collections::HashSet<*const LoadedPlugin> = plugins.iter().map(|p| Arc::as_ptr(p)).collect();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|h| h.strong_count() > 0 && !released.contains(&h.as_ptr()));
        drop(held);
        let now = self.serving.read().unwrap_or_else(|p| p.into_inner()).clone();
        self.announce(&now);
    }

    /// Announces each plugin that came (`kiln.plugin.loaded`, also for a new version of one
    /// already serving) or went (`kiln.plugin.unloaded`) since the last announcements. A
    /// version held back is not announced yet, and the one it replaces not taken back yet.
    fn announce(&self, now: &HashMap<String, Arc<LoadedPlugin>>) {
        let mut events = Vec::new();
        {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let held: std::collections::HashSet<*const LoadedPlugin> = held.iter().map(|h| h.as_ptr()).collect();
            let is_held = |p: &Arc<LoadedPlugin>| held.contains(&Arc::as_ptr(p));
            let mut announced = self.announced.lock().unwrap_or_else(|p| p.into_inner());
            for (name, plugin) in now {
                let known = announced.get(name).is_some_and(|(a, _)| std::ptr::eq(a.as_ptr(), Arc::as_ptr(plugin)));
                if known || is_held(plugin) {
                    continue;
                }
                let version = plugin.description().version.clone();
                events.push(("kiln.plugin.loaded", name.clone(), version.clone()));
                announced.insert(name.clone(), (Arc::downgrade(plugin), version));
            }
            announced.retain(|name, (_, version)| {
                let stays = now.contains_key(name);
                if !stays {
                    events.push(("kiln.plugin.unloaded", name.clone(), version.clone()));
                }
                stays
            });
        }
        for (topic, name, version) in events {
            let _ = self.publish(topic, json!({ "name": name, "version": version }), Source::Kiln);
        }
    }

    /// Subscribes instance `instance` of `plugin` (see `HostCtx::key`) to `pattern` at runtime,
    /// as its subscription `id`; with `once`, for the first matching event only. It ends with
    /// the instance, or with [`EventBus::unsubscribe_runtime`].
    pub fn subscribe_runtime(
        self: &Arc<Self>,
        plugin: &str,
        instance: usize,
        pattern: &str,
        id: u32,
        once: bool,
    ) -> Result<(), String> {
        let pattern = Pattern::parse(pattern)?;
        let target = Target::Runtime { instance, id, once };
        let mut subscribers = self.subscribers.write().unwrap_or_else(|p| p.into_inner());
        let taken = |s: &Arc<Subscriber>| matches!(s.target, Target::Runtime { instance: i, id: n, .. } if i == instance && n == id);
        if subscribers.iter().any(taken) {
            return Err(format!("subscription {id} exists already"));
        }
        subscribers.push(self.subscribe(plugin, pattern, &format!("runtime#{id}"), target, self.timeout));
        Ok(())
    }

    /// Ends runtime subscription `id` of `instance`; whether there was one.
    pub fn unsubscribe_runtime(&self, instance: usize, id: u32) -> bool {
        self.remove(|t| matches!(t, Target::Runtime { instance: i, id: n, .. } if *i == instance && *n == id))
    }

    /// Ends every runtime subscription of `instance` (it was retired).
    pub fn forget_instance(&self, instance: usize) {
        self.remove(|t| matches!(t, Target::Runtime { instance: i, .. } if *i == instance));
    }

    fn remove(&self, which: impl Fn(&Target) -> bool) -> bool {
        let mut subscribers = self.subscribers.write().unwrap_or_else(|p| p.into_inner());
        let before = subscribers.len();
        subscribers.retain(|s| {
            let gone = which(&s.target);
            if gone {
                s.end();
            }
            !gone
        });
        subscribers.len() != before
    }

    /// Starts a subscription of `plugin` and its delivery task.
    fn subscribe(
        self: &Arc<Self>,
        plugin: &str,
        pattern: Pattern,
        handler: &str,
        target: Target,
        timeout: Duration,
    ) -> Arc<Subscriber> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let active = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let delivery = Delivering {
            bus: Arc::downgrade(self),
            plugin: plugin.to_string(),
            pattern: pattern.as_str().to_string(),
            handler: handler.to_string(),
            target,
            counters: counters.clone(),
            timeout,
            current: Mutex::new(None),
            active: active.clone(),
        };
        let task = self.runtime.spawn(delivery.run(rx)).abort_handle();
        Arc::new(Subscriber {
            plugin: plugin.to_string(),
            pattern,
            handler: handler.to_string(),
            target,
            tx,
            counters,
            task,
            active,
        })
    }

    /// The version of `plugin` serving now (the bus follows what serves).
    pub fn serving(&self, plugin: &str) -> Option<Arc<LoadedPlugin>> {
        self.serving.read().unwrap_or_else(|p| p.into_inner()).get(plugin).cloned()
    }
}

/// Most events one trip to the blocking pool delivers.
const BATCH: usize = 256;

/// A batch's events, each taken off the queue's byte budget as its turn comes; those whose turn
/// never comes (the delivery ended early, or panicked) are taken off when the batch drops.
struct Turns<'a> {
    counters: &'a Counters,
    events: std::vec::IntoIter<Arc<Event>>,
}

impl Iterator for Turns<'_> {
    type Item = Arc<Event>;

    fn next(&mut self) -> Option<Arc<Event>> {
        let event = self.events.next()?;
        self.counters.release(event.json.len());
        Some(event)
    }
}

impl Drop for Turns<'_> {
    fn drop(&mut self) {
        for event in self.events.by_ref() {
            self.counters.release(event.json.len());
        }
    }
}

/// The delivery task of one subscription.
struct Delivering {
    bus: std::sync::Weak<EventBus>,
    plugin: String,
    pattern: String,
    handler: String,
    target: Target,
    counters: Arc<Counters>,
    timeout: Duration,
    /// The event being handled now, since when, and whether it was already counted as timed
    /// out (by the watch in `run`, while the handler still runs).
    current: Mutex<Option<(Arc<Event>, std::time::Instant, bool)>>,
    /// The subscription's flag (see `Subscriber::end`).
    active: Arc<std::sync::atomic::AtomicBool>,
}

impl Delivering {
    /// Takes the queued events in batches and hands each batch to the blocking pool, where they
    /// are delivered one at a time, in order. Meanwhile it watches the time: an event whose
    /// handler runs past the timeout is counted as timed out then (the handler cannot be
    /// stopped: the subscription waits for it, and its queue fills and drops meanwhile).
    async fn run(self, mut rx: mpsc::Receiver<Arc<Event>>) {
        let me = Arc::new(self);
        let mut batch = Vec::with_capacity(BATCH);
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            let events = std::mem::take(&mut batch);
            let deliver = me.clone();
            let mut call = tokio::task::spawn_blocking(move || deliver.deliver(events));
            loop {
                match tokio::time::timeout(me.timeout.min(Duration::from_secs(1)), &mut call).await {
                    Ok(_) => break,
                    Err(_) => me.watch(),
                }
            }
            if me.bus.strong_count() == 0 {
                return;
            }
        }
    }

    /// Counts the event being handled as timed out once it has run past the timeout.
    fn watch(&self) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((event, started, counted)) = current.as_mut()
            && !*counted
            && started.elapsed() > self.timeout
        {
            *counted = true;
            let event = event.clone();
            drop(current);
            if let Some(bus) = self.bus.upgrade() {
                let msg = format!("the handler ran past its timeout of {:?}", self.timeout);
                self.record(&bus, &event, Outcome::TimedOut, Some(msg));
            }
        }
    }

    /// Delivers `events` one at a time on this (blocking) thread, each to the version of the
    /// plugin serving when its turn comes.
    fn deliver(&self, events: Vec<Arc<Event>>) {
        let turns = Turns { counters: &self.counters, events: events.into_iter() };
        for event in turns {
            let Some(bus) = self.bus.upgrade() else { return };
            if !self.active.load(Ordering::SeqCst) {
                self.record(&bus, &event, Outcome::Dropped, Some("the subscription ended".into()));
                continue;
            }
            let Some(plugin) = bus.serving(&self.plugin) else {
                self.record(&bus, &event, Outcome::Dropped, Some("the plugin does not serve".into()));
                continue;
            };
            let index = match self.target {
                Target::Declared => plugin
                    .description()
                    .subscriptions
                    .iter()
                    .position(|d| d.pattern == self.pattern && d.handler == self.handler)
                    .map(|i| i as u32),
                Target::Runtime { instance, id, .. } => {
                    (plugin.host_key() == instance).then_some(RUNTIME_SUBSCRIPTION | id)
                }
            };
            let Some(index) = index else {
                self.record(&bus, &event, Outcome::Dropped, Some("the serving version does not subscribe".into()));
                continue;
            };
            if let Target::Runtime { instance, id, once: true } = self.target {
                // This event is its one: nothing is queued or delivered after it.
                bus.unsubscribe_runtime(instance, id);
            }
            let started = std::time::Instant::now();
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((event.clone(), started, false));
            let result = {
                // What the handler emits is one step deeper (see `publish`).
                let _depth = DepthMark::enter(event.depth);
                plugin.event(index, &event.topic, event.json.as_bytes(), started + self.timeout)
            };
            drop(plugin);
            let counted = self.current.lock().unwrap_or_else(|p| p.into_inner()).take().is_some_and(|c| c.2);
            if counted {
                continue; // already counted as timed out
            }
            let (outcome, error) = match result {
                Ok(()) if started.elapsed() > self.timeout => {
                    (Outcome::TimedOut, Some(format!("the handler ran past its timeout of {:?}", self.timeout)))
                }
                Ok(()) => (Outcome::Delivered, None),
                Err(e) => (Outcome::Failed, Some(e)),
            };
            self.record(&bus, &event, outcome, error);
            if matches!(self.target, Target::Runtime { once: true, .. }) {
                return; // its one event
            }
        }
    }

    fn record(&self, bus: &EventBus, event: &Event, outcome: Outcome, error: Option<String>) {
        let counter = match outcome {
            Outcome::Delivered => &self.counters.delivered,
            Outcome::Failed => &self.counters.failed,
            Outcome::TimedOut => &self.counters.timed_out,
            Outcome::Dropped => &self.counters.dropped,
        };
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        // The first ten of each kind, then every hundredth (with the count so far): a
        // subscriber failing on every event must not push every other line out of its log.
        if let Some(error) = error.as_ref().filter(|_| n <= 10 || n.is_multiple_of(100)) {
            let msg = format!(
                "event {} → {}: {} ({error}; {n} {} so far)",
                event.topic,
                self.handler,
                outcome.as_str(),
                outcome.as_str()
            );
            tracing::warn!(plugin = %self.plugin, "{msg}");
            let kind = if error.contains("panicked") { Kind::Panic } else { Kind::Log };
            bus.logs.push(&self.plugin, LogEntry::new(Level::Warn, kind, msg, json!({ "event": event.id }), None));
        }
        event.record(Delivery { plugin: self.plugin.clone(), handler: self.handler.clone(), outcome, error });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data whose JSON text is about 1 MB.
    fn megabyte() -> Value {
        json!({ "pad": "x".repeat(1_000_000) })
    }

    /// Large events are held to a byte budget: a subscriber that does not keep up has events
    /// dropped (counted) once its queue holds [`QUEUE_BYTES`], long before [`QUEUE`] events, and
    /// the recent events keep [`RECENT_BYTES`] of data at most. Its budget frees as events
    /// are taken.
    #[tokio::test(flavor = "current_thread")]
    async fn large_events_are_held_to_a_byte_budget() {
        let bus = EventBus::new(Arc::new(LogStore::default()), Duration::from_secs(5));
        bus.subscribe_runtime("p", 1, "big.*", 1, false).unwrap();
        // On this one thread the delivery task cannot run until the test awaits: all of these
        // wait in the queue.
        let size = megabyte().to_string().len();
        for _ in 0..40 {
            bus.publish("big.one", megabyte(), Source::Api).unwrap();
        }
        let fits = QUEUE_BYTES / size;
        let stats = &bus.stats("p")[0];
        assert_eq!(stats.dropped, (40 - fits) as u64, "{stats:?}");
        assert!(fits < 40, "the test must overflow the budget");

        let recent = bus.recent(RECENT);
        assert_eq!(recent.len(), RECENT_BYTES / size, "recent events kept");
        assert!(recent.iter().map(|e| e.json.len()).sum::<usize>() <= RECENT_BYTES);
        // One more large event (no subscriber hears it): the oldest gives way.
        let oldest = recent.last().unwrap().id;
        bus.publish("other.one", megabyte(), Source::Api).unwrap();
        let now = bus.recent(RECENT);
        assert_eq!((now.len(), now[0].topic.as_str()), (recent.len(), "other.one"));
        assert!(now.iter().all(|e| e.id != oldest), "the oldest gave way");

        // The delivery task takes the queue (the plugin does not serve: each is dropped as
        // such), and the budget frees: the next large event is queued.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while bus.stats("p")[0].dropped < 40 {
            assert!(std::time::Instant::now() < deadline, "the queue was not taken: {:?}", bus.stats("p"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let dropped = bus.stats("p")[0].dropped;
        let event = bus.publish("big.one", megabyte(), Source::Api).unwrap();
        assert!(event.settled(Duration::from_secs(30)).await);
        assert_eq!(event.deliveries()[0].error.as_deref(), Some("the plugin does not serve"));
        assert_eq!(bus.stats("p")[0].dropped, dropped + 1);
    }
}
