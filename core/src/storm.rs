//! Storm coalescing for the listener's hints.
//!
//! A notification only says "look at plugin X again", and a pass acts on the row as it is when
//! the pass reads it. So when notifications come faster than ordinary edits do (over
//! [`STORM_NOTES`] in one [`WINDOW`]: a script or a tool committing row after row), kiln stops
//! reacting to each one. It holds the plugin ids they name, once each, and lets them go
//! [`STORM_PASSES`] a second, the longest held first; each goes to one pass, from the row as it
//! is then. When the storm ends, every id still held goes at once. Nothing is lost by skipping
//! the writes in between: the last one is what the row holds. What is saved is a pass per write
//! (a row read, a load or a reconfigure, a route table, a recorded transaction): CPU and round
//! trips that the editors' own commits need. (client-go's work queues bound a controller the
//! same way: an overall token bucket beside per-item coalescing.)
//!
//! The storm ends when no notification came for [`QUIET`], or when the rate falls below half
//! the threshold. A bulk statement is one notification (`sql/010_statement_notify.sql`), and
//! the listener never holds the ids of a statement over several rows: only one-row statements
//! make up a storm and are held.
//!
//! What this costs: during a storm a plugin follows its row late, by up to the number of
//! plugins held divided by [`STORM_PASSES`] (5 s for 100 plugins). Passes asked for by the admin
//! API, the watcher or a resync are not held: they do not come through here.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// The span notifications are counted over.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Notifications in one [`WINDOW`] that make a storm (1,000 a second).
pub const STORM_NOTES: u32 = 100;
/// A storm is over when no notification came for this long.
pub const QUIET: Duration = Duration::from_millis(25);
/// During a storm, held plugins are let go at this many a second, the longest held first.
pub const STORM_PASSES: u32 = 20;

/// Decides which plugin ids the listener hints now and which it holds (see the module docs).
#[derive(Debug)]
pub struct StormGate {
    /// Start of the current counting window.
    window_start: Instant,
    /// Notifications in the current window, and in the one before.
    this_window: u32,
    last_window: u32,
    /// When the last notification came.
    last_note: Option<Instant>,
    storming: bool,
    /// Held ids, the longest held first, and the same as a set.
    queue: VecDeque<i64>,
    held: HashSet<i64>,
    /// When the next held id may go (one every `1 / STORM_PASSES` seconds).
    next_drip: Instant,
}

impl StormGate {
    pub fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            this_window: 0,
            last_window: 0,
            last_note: None,
            storming: false,
            queue: VecDeque::new(),
            held: HashSet::new(),
            next_drip: now,
        }
    }

    /// `notes` notifications arrived at `now`, naming `ids`: returns the ids to hint now (all of
    /// them, unless a storm is on; then none, and they are held).
    pub fn admit(&mut self, now: Instant, notes: u32, ids: Vec<i64>) -> Vec<i64> {
        self.count(now, notes);
        if !self.storming {
            return ids;
        }
        for id in ids {
            if self.held.insert(id) {
                self.queue.push_back(id);
            }
        }
        Vec::new()
    }

    /// The held ids to hint at `now`: all of them when the storm is over, else those whose turn
    /// has come (one every `1 / STORM_PASSES` seconds, the longest held first).
    pub fn release(&mut self, now: Instant) -> Vec<i64> {
        if self.storming && (self.calm(now) || self.rate(now) < STORM_NOTES / 2) {
            self.storming = false;
            self.this_window = 0;
            self.last_window = 0;
            self.window_start = now;
            self.held.clear();
            let mut all: Vec<i64> = self.queue.drain(..).collect();
            all.sort_unstable();
            return all;
        }
        let mut out = Vec::new();
        // No burst after a pause: at most one interval's worth is owed.
        self.next_drip = self.next_drip.max(now.checked_sub(drip()).unwrap_or(now));
        while self.next_drip <= now
            && let Some(id) = self.queue.pop_front()
        {
            self.held.remove(&id);
            out.push(id);
            self.next_drip += drip();
        }
        out
    }

    /// When [`StormGate::release`] should be called next: the next turn of a held id, or the
    /// moment the storm would be calm (`None`: no storm and nothing held).
    pub fn next_release(&self) -> Option<Instant> {
        // While it storms, the calm is awaited even with nothing held (the storm must end, to
        // be counted again when it starts over).
        let calm = self.storming.then(|| self.last_note.map(|t| t + QUIET)).flatten();
        let drip = (!self.queue.is_empty()).then_some(self.next_drip);
        match (calm, drip) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How many plugin ids are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether a storm is on.
    pub fn storming(&self) -> bool {
        self.storming
    }

    fn calm(&self, now: Instant) -> bool {
        self.last_note.is_none_or(|t| now.saturating_duration_since(t) >= QUIET)
    }

    fn count(&mut self, now: Instant, notes: u32) {
        self.roll(now);
        if notes == 0 {
            return; // other channels' notifications
        }
        self.this_window = self.this_window.saturating_add(notes);
        self.last_note = Some(now);
        if self.rate(now) > STORM_NOTES {
            self.storming = true;
        }
    }

    /// Moves the windows on to `now`.
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WINDOW {
            self.last_window = if elapsed >= 2 * WINDOW { 0 } else { self.this_window };
            self.this_window = 0;
            self.window_start = now;
        }
    }

    /// Notifications in the last [`WINDOW`], estimated from the two windows (the one before
    /// weighted by how much of it the last `WINDOW` still covers).
    fn rate(&mut self, now: Instant) -> u32 {
        self.roll(now);
        let into = now.saturating_duration_since(self.window_start).as_secs_f64() / WINDOW.as_secs_f64();
        self.this_window + (f64::from(self.last_window) * (1.0 - into.min(1.0))) as u32
    }
}

/// The interval between two held plugins let go during a storm.
fn drip() -> Duration {
    Duration::from_secs(1) / STORM_PASSES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn ordinary_edits_pass_at_once() {
        let t0 = Instant::now();
        let mut gate = StormGate::new(t0);
        // 50 in one window: under the threshold.
        for i in 0..50 {
            assert_eq!(gate.admit(t0 + ms(i), 1, vec![7]), vec![7]);
        }
        // A bulk statement is one notification, whatever its rows.
        let many: Vec<i64> = (1..=1000).collect();
        assert_eq!(gate.admit(t0 + ms(60), 1, many.clone()), many);
        assert!(!gate.storming());
        assert_eq!(gate.next_release(), None);
    }

    #[test]
    fn a_storm_is_held_and_let_go_when_it_ends() {
        let t0 = Instant::now();
        let mut gate = StormGate::new(t0);
        let (mut passed, mut dripped) = (Vec::new(), Vec::new());
        // 10 a millisecond for 40 ms: a storm from the 101st on.
        for i in 0..400u64 {
            let at = t0 + us(i * 100);
            passed.extend(gate.admit(at, 1, vec![(i % 20) as i64]));
            dripped.extend(gate.release(at));
        }
        assert!(gate.storming());
        assert!(passed.len() <= 101, "{} passed", passed.len());
        // One let go at once (the first turn), none since: one per 50 ms. It is held again by
        // its next notification.
        assert_eq!(dripped.len(), 1, "{dripped:?}");
        assert_eq!(gate.held(), 20);
        let last = t0 + us(39_900);
        assert!(gate.release(last + ms(5)).is_empty(), "not calm yet");
        // The next turn or the calm, whichever comes first.
        assert!(gate.next_release().is_some_and(|at| at > last + ms(5) && at <= last + QUIET));
        // Calm: everything held goes, once.
        assert_eq!(gate.release(last + QUIET), (0..20).collect::<Vec<_>>());
        assert!(!gate.storming());
        assert_eq!(gate.held(), 0);
        assert_eq!(gate.next_release(), None);
    }

    #[test]
    fn a_long_storm_lets_plugins_go_at_the_set_rate_longest_held_first() {
        let t0 = Instant::now();
        let mut gate = StormGate::new(t0);
        let mut released: Vec<(u64, i64)> = Vec::new();
        // 3 s of 10 notifications a millisecond over 100 plugins.
        for step in 0..30_000u64 {
            let at = t0 + us(step * 100);
            gate.admit(at, 1, vec![(step % 100) as i64]);
            released.extend(gate.release(at).into_iter().map(|id| (step / 10, id)));
        }
        assert!(gate.storming());
        // STORM_PASSES a second, evenly: 60 in 3 s (± the first turn).
        let n = released.len() as u32;
        assert!((3 * STORM_PASSES..=3 * STORM_PASSES + 1).contains(&n), "{n} let go");
        for pair in released[1..].windows(2) {
            assert!(pair[1].0 - pair[0].0 >= 49, "{pair:?}");
        }
        // The longest held first: in the order they were first held, none twice.
        let ids: Vec<i64> = released.iter().map(|r| r.1).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "{ids:?}");
        assert!(gate.held() <= 100);
    }

    #[test]
    fn no_burst_after_a_pause() {
        let t0 = Instant::now();
        let mut gate = StormGate::new(t0);
        for i in 0..10_000u64 {
            gate.admit(t0 + us(i * 100), 1, vec![(i % 100) as i64]);
        }
        // No release for a whole second (a busy runtime): two go (one turn late), not twenty.
        assert!(gate.storming());
        assert_eq!(gate.release(t0 + ms(1000)).len(), 2);
    }

    #[test]
    fn a_storm_that_slows_down_ends() {
        let t0 = Instant::now();
        let mut gate = StormGate::new(t0);
        for i in 0..200u64 {
            gate.admit(t0 + us(i * 100), 1, vec![1]);
        }
        assert!(gate.storming());
        // Then one every 8 ms (never QUIET apart): the rate falls below half the threshold.
        let mut at = t0 + ms(20);
        let mut let_go = Vec::new();
        for _ in 0..30 {
            let_go.extend(gate.admit(at, 1, vec![2]));
            let_go.extend(gate.release(at));
            at += ms(8);
        }
        assert!(!gate.storming());
        assert!(let_go.contains(&1) && let_go.contains(&2), "{let_go:?}");
    }
}
