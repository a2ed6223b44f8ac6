//! A minimal HTTP/1.1 load generator: keep-alive connections over raw TCP, each sending GETs
//! back to back. Deliberately thin so that, on a small machine, the server stays the bottleneck.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Results of one load run.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    request: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: SocketAddr, path: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes();
        Ok(Self { stream, buf: Vec::with_capacity(8192), request })
    }

    /// A connection that sends `POST path` with a JSON `body`.
    pub async fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<Self> {
        let mut conn = Self::open(addr, path).await?;
        conn.request = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        Ok(conn)
    }

    /// Sends the request and reads the whole response; returns its status.
    pub async fn get(&mut self) -> std::io::Result<u16> {
        self.stream.write_all(&self.request).await?;
        self.buf.clear();
        let (head_end, status, length) = loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..pos]).map_err(std::io::Error::other)?;
                let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                break (pos + 4, status, length);
            }
        };
        while self.buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(status)
    }
}

/// Runs `conns` connections against `path` for `duration`.
pub async fn run(addr: SocketAddr, path: &str, conns: usize, duration: Duration) -> Stats {
    run_until(addr, path, conns, Some(duration), Arc::new(AtomicBool::new(false))).await
}

/// Runs until `stop` is set (or `duration`, if given, has passed).
pub async fn run_until(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    duration: Option<Duration>,
    stop: Arc<AtomicBool>,
) -> Stats {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let path = path.to_string();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut failed = 0u64;
            let mut conn = Conn::open(addr, &path).await.expect("connect");
            while !stop.load(Ordering::Relaxed) && duration.is_none_or(|d| start.elapsed() < d) {
                let t = Instant::now();
                match conn.get().await {
                    Ok(200) => latencies.push(t.elapsed().as_micros() as u32),
                    Ok(_) => failed += 1,
                    Err(_) => {
                        failed += 1;
                        conn = Conn::open(addr, &path).await.expect("reconnect");
                    }
                }
            }
            (latencies, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await.expect("load task");
        all.extend(l);
        failed += f;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0) as f64
    };
    Stats { ok: all.len() as u64, failed, rps: all.len() as f64 / elapsed, p50_us: pct(0.50), p99_us: pct(0.99) }
}

/// The value at quantile `q` of `values` (sorted in place).
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(((values.len() as f64 * q) as usize).min(values.len().saturating_sub(1))).copied().unwrap_or(f64::NAN)
}
