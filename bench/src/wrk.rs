//! wrk, the external load generator: a separate process, so the load it makes costs the server's
//! process nothing. `bench/run` installs it (Debian's `wrk` package) when it is missing.

use crate::load::Stats;
use std::net::SocketAddr;
use std::time::Duration;

/// Runs `wrk` (one thread, `conns` keep-alive connections) against `path` for `duration`.
pub async fn run(addr: SocketAddr, path: &str, conns: usize, duration: Duration) -> anyhow::Result<Stats> {
    let url = format!("http://{addr}{path}");
    let secs = format!("{}s", duration.as_secs().max(1));
    let conns = conns.to_string();
    let output = tokio::process::Command::new("wrk")
        .args(["-t1", "-c", &conns, "-d", &secs, "--latency", &url])
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("running wrk ({e}): install it with `apt-get install wrk`, or run bench/run"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(output.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    parse(&text)
}

/// Reads wrk's report: requests/s, the 50th and 99th latency percentiles, and failures.
fn parse(text: &str) -> anyhow::Result<Stats> {
    let field = |prefix: &str| -> Option<&str> {
        text.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix)).map(str::trim)
    };
    let rps: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no Requests/sec in {text}"))?;
    let p50 = field("50%").and_then(micros).ok_or_else(|| anyhow::anyhow!("no 50% latency in {text}"))?;
    let p99 = field("99%").and_then(micros).ok_or_else(|| anyhow::anyhow!("no 99% latency in {text}"))?;
    let ok = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse::<u64>().ok()))
        .unwrap_or(0);
    let non_2xx = field("Non-2xx or 3xx responses:").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let socket_errors: u64 = field("Socket errors:")
        .map(|v| v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    let failed = non_2xx + socket_errors;
    Ok(Stats { ok: ok.saturating_sub(non_2xx), failed, rps, p50_us: p50, p99_us: p99 })
}

/// `123.45us`, `1.20ms` or `2.00s`, in microseconds.
fn micros(v: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    Some(number.trim().parse::<f64>().ok()? * factor)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 3s test @ http://127.0.0.1:8080/powertable
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   150.21us   50.10us   2.10ms   90.00%
    Req/Sec   100.00k     1.00k  110.00k    70.00%
  Latency Distribution
     50%  140.00us
     75%  160.00us
     90%  190.00us
     99%    1.20ms
  300000 requests in 3.00s, 40.00MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec: 100000.00
Transfer/sec:     13.33MB
";
        let s = super::parse(report).unwrap();
        assert_eq!((s.rps, s.p50_us, s.p99_us, s.ok, s.failed), (100000.0, 140.0, 1200.0, 299995, 8));
    }
}
