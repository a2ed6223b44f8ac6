//! Waiting for the other process without sleeping, while nothing else wants the CPU.
//!
//! A call to an isolated plugin crosses processes twice, and each crossing wakes a thread that
//! sleeps in `read`. On a virtual machine, waking an idle vCPU costs tens of microseconds: a
//! ping-pong of 64 bytes over a Unix socket between two processes on this 2-core VM takes 67 µs
//! per round trip (p50) when both sides block, and 5 µs when each polls its socket for up to
//! 100 µs before blocking (`/tmp`-style measurement kept in the session note of issue 12). So a
//! side that is *alone* (no other call in flight on that side) polls for a short budget before
//! it blocks. Under load several calls are in flight, nobody polls, and the cores go to the
//! work; the budget bounds what an idle plugin costs (at most 100 µs of CPU per call).
//!
//! Alone *now* is not enough: with many clients, each sending its requests one after another,
//! there are moments with a single call in flight, and a plugin's process is often alone
//! between calls, yet the next call on the connection it polls is a whole client round trip
//! away: every such poll ran to its budget (measured under wrk with 16 connections: a fifth of
//! both cores spent polling, 0.78× the throughput of not polling). So only *sequential* calls
//! poll: none other was in flight in kiln for [`QUIET`]. kiln tells the plugin's process so in
//! the call ([`super::wire::HANDLE_THEN_POLL`]).

use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long after two calls overlapped calls count as concurrent (see the module's docs).
const QUIET: Duration = Duration::from_millis(20);
/// When two calls were last in flight at once, in µs since [`epoch`] (0: never).
static LAST_OVERLAP_US: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// µs since [`epoch`], at least 1.
fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64 + 1
}

/// How long a lone waiter polls before it blocks, in µs (`--isolation-poll-us`; 0: never).
static BUDGET_US: AtomicU64 = AtomicU64::new(100);

/// Sets how long a lone waiter polls (for this process: the server, or a plugin's process).
pub fn set_budget(budget: Duration) {
    BUDGET_US.store(budget.as_micros() as u64, Ordering::Relaxed);
}

/// How long a lone waiter polls before it blocks.
pub fn budget() -> Duration {
    Duration::from_micros(BUDGET_US.load(Ordering::Relaxed))
}

/// Polls `fd` until it has input (or an error or hang-up, which the read that follows
/// reports) or `budget` passes. Whether it is ready.
pub fn ready_within(fd: RawFd, budget: Duration) -> bool {
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    loop {
        if ready_now(fd) {
            return true;
        }
        if start.elapsed() >= budget {
            return false;
        }
        std::hint::spin_loop();
    }
}

/// Whether `fd` has input (or an error or hang-up) now, without waiting.
pub fn ready_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd that lives for the call; a timeout of 0 never blocks.
    unsafe { libc::poll(&mut p, 1, 0) != 0 }
}

/// Blocks until `fd` has input (or an error or hang-up, which the read that follows reports).
///
/// A thread blocked in `recv` on a Unix stream socket is woken whenever its peer reads, which
/// frees the socket's send space (`unix_write_space` wakes every sleeper of the socket): a
/// plugin's process waiting for its next call was woken, for nothing, by kiln reading each
/// reply. `poll` for input alone filters those wake-ups out.
pub fn wait_readable(fd: RawFd) {
    loop {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd that lives for the call.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n != 0 && !(n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted) {
            return;
        }
    }
}

/// Calls in flight on one side of the boundary (a counter), entered for the length of a call.
pub struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    pub fn enter(count: &'a AtomicUsize) -> Self {
        if count.fetch_add(1, Ordering::AcqRel) > 0 {
            LAST_OVERLAP_US.fetch_max(now_us(), Ordering::Relaxed);
        }
        Self(count)
    }

    /// Whether this is the only call in flight.
    pub fn alone(&self) -> bool {
        self.0.load(Ordering::Acquire) == 1
    }

    /// Whether this is the only call in flight, and none overlapped another (on any counter of
    /// this process) for [`QUIET`]: one request after another.
    pub fn sequential(&self) -> bool {
        let last = LAST_OVERLAP_US.load(Ordering::Relaxed);
        self.alone() && (last == 0 || now_us().saturating_sub(last) > QUIET.as_micros() as u64)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn it_returns_when_input_arrives_or_the_budget_ends() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let started = Instant::now();
        assert!(!ready_within(b.as_raw_fd(), Duration::from_micros(200)));
        assert!(started.elapsed() >= Duration::from_micros(200));
        a.write_all(b"x").unwrap();
        assert!(ready_within(b.as_raw_fd(), Duration::from_secs(5)));
        drop(a);
        let count = AtomicUsize::new(0);
        let first = InFlight::enter(&count);
        assert!(first.alone());
        let second = InFlight::enter(&count);
        assert!(!first.alone() && !second.alone());
        drop(second);
        assert!(first.alone());
        assert!(!first.sequential(), "two calls overlapped just now");
    }
}
