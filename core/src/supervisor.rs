//! The supervisor of `kiln serve`: runs the server as a child process and starts it again when a
//! plugin takes it down.
//!
//! A loaded plugin runs inside the server, so its `abort()`, segfault or `exit()` ends the
//! process. The supervisor sees how (the signal or the exit code) and restarts the server, which
//! finds the load marker of the plugin that did it (see `load_marker`), marks its row
//! `CrashedDuringLoad` with that signal or code, and serves the others. A server that ends with
//! an error of its own (a taken port, a bad setting) is not restarted: its exit code is passed
//! on. Five crashes within a minute end the supervisor too: a crash it cannot pin on a plugin
//! load would otherwise loop forever. SIGINT and SIGTERM are passed to the server, which shuts
//! down as usual.

use crate::load_marker::LAST_EXIT_ENV;
use anyhow::Context;
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// Set in the server process the supervisor starts (so that it serves instead of supervising).
pub const CHILD_ENV: &str = "KILN_SUPERVISED";

/// Crashes within [`CRASH_WINDOW`] after which the supervisor gives up.
const MAX_CRASHES: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// Runs the server (this executable, same arguments) until it ends for good. `markers` is the
/// directory of load markers, which tells a plugin's `exit()` from the server's own error exit.
pub async fn run(markers: &Path) -> anyhow::Result<ExitStatus> {
    let exe = std::env::current_exe().context("finding the kiln executable")?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut last_exit: Option<String> = None;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(&args).env(CHILD_ENV, "1");
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe. It asks the kernel to send SIGTERM to the server when the
        // supervisor dies (even by SIGKILL), so no server outlives its supervisor.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match &last_exit {
            Some(how) => cmd.env(LAST_EXIT_ENV, how),
            None => cmd.env_remove(LAST_EXIT_ENV),
        };
        let mut child = cmd.spawn().context("starting the kiln server")?;
        let status = tokio::select! {
            status = child.wait() => status?,
            _ = term.recv() => return stop(&mut child).await,
            _ = int.recv() => return stop(&mut child).await,
        };
        let killed = status.signal().is_some();
        let died_loading = crate::load_marker::LoadMarkers::new(markers.to_path_buf()).any_pending();
        if status.success() || !(killed || died_loading) {
            return Ok(status);
        }
        let how = describe(status);
        let now = Instant::now();
        crashes.push_back(now);
        crashes.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        if crashes.len() >= MAX_CRASHES {
            tracing::error!("the kiln server {how}, the {MAX_CRASHES}th time within {CRASH_WINDOW:?}; giving up");
            return Ok(status);
        }
        let pause = Duration::from_millis(250) * crashes.len() as u32;
        tracing::error!("the kiln server {how}; starting it again in {pause:?}");
        tokio::time::sleep(pause).await;
        last_exit = Some(how);
    }
}

/// Passes the shutdown on to the server and waits for it.
async fn stop(child: &mut tokio::process::Child) -> anyhow::Result<ExitStatus> {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid of our own child and a valid signal has no memory effects;
        // if the child already exited and was reaped, the call fails harmlessly (ESRCH).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    Ok(child.wait().await?)
}

/// "killed by signal 6 (SIGABRT)" or "exited with code 3".
pub fn describe(status: ExitStatus) -> String {
    if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGABRT => "SIGABRT",
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGBUS => "SIGBUS",
            libc::SIGILL => "SIGILL",
            libc::SIGFPE => "SIGFPE",
            libc::SIGKILL => "SIGKILL",
            libc::SIGTERM => "SIGTERM",
            _ => "signal",
        };
        return format!("killed by signal {sig} ({name})");
    }
    match status.code() {
        Some(code) => format!("exited with code {code}"),
        None => "ended".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_by_signal_or_code() {
        assert_eq!(describe(ExitStatus::from_raw(libc::SIGABRT)), "killed by signal 6 (SIGABRT)");
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exited with code 3");
    }
}
