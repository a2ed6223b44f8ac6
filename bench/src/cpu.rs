//! CPU time of a group of this process's threads, picked by name prefix, from Linux's
//! `/proc/self/task/*/schedstat` (nanoseconds on a CPU). Divided by the requests served, it is a
//! per-request cost that this shared machine's swings in speed disturb far less than a rate.

/// Nanoseconds the live threads whose name starts with `prefix` have spent on a CPU.
pub fn threads_ns(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            if !comm.trim_end().starts_with(prefix) {
                return None;
            }
            std::fs::read_to_string(task.path().join("schedstat")).ok()?.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_the_named_threads_and_only_them() {
        let (go, started) = std::sync::mpsc::channel::<u64>();
        let (finished, done) = std::sync::mpsc::channel::<()>();
        let busy = std::thread::Builder::new()
            .name("cpu-test-busy".into())
            .spawn(move || {
                let from: u64 = started.recv().unwrap();
                // Until it has had 30 ms of CPU (as the counter reads it), not 30 ms of wall time:
                // on a busy machine a thread may get much less of a CPU than of the clock.
                let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while super::threads_ns("cpu-test-") - from < 30_000_000 && std::time::Instant::now() < give_up {
                    for _ in 0..10_000 {
                        std::hint::black_box(0u64);
                    }
                }
                finished.send(()).unwrap();
                std::thread::park();
            })
            .unwrap();
        let before = super::threads_ns("cpu-test-");
        go.send(before).unwrap();
        done.recv().unwrap();
        let after = super::threads_ns("cpu-test-");
        assert!(after - before >= 20_000_000, "the busy thread's ~30 ms show: {before} → {after}");
        assert_eq!(super::threads_ns("no-such-thread-"), 0);
        busy.thread().unpark();
        busy.join().unwrap();
    }
}
