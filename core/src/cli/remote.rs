//! The terminal interface to a running server: `kiln status`, `kiln plugins`, `kiln reload`,
//! `kiln logs` and `kiln install`, over its admin API, with the address and token the server
//! takes (`KILN_ADDR`, `KILN_ADMIN_TOKEN`).
//!
//! Exit status: 0 done; 1 the server refused or reported a failure (its error code and message
//! are printed); 3 the server could not be reached (2 is clap's, for a malformed command line).

use futures_util::StreamExt;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Where the server is.
#[derive(Debug, Clone, clap::Args)]
pub struct Server {
    /// The server's address (as `kiln serve` binds it; an unspecified IP means this machine).
    #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:9999")]
    pub addr: SocketAddr,
    /// The admin API's bearer token, when the server has one.
    #[arg(long, env = "KILN_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A command for a running server.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Remote {
    /// The server's health: database, listener, plugins by state (exit 1 when degraded).
    Status {
        #[command(flatten)]
        server: Server,
    },
    /// Every plugin: status, state, version, and the first line of its error.
    Plugins {
        #[command(flatten)]
        server: Server,
    },
    /// Rebuild a plugin if its source changed and load a fresh instance (exit 1 if it failed).
    Reload {
        name: String,
        #[command(flatten)]
        server: Server,
    },
    /// A plugin's recent log lines; `-f` follows new ones as they are logged.
    Logs {
        name: String,
        #[command(flatten)]
        server: Server,
        /// Keep printing new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only lines this severe or more (`error`, `warn`, `info`, `debug`, `trace`).
        #[arg(long)]
        level: Option<String>,
        /// At most this many recent lines.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Upload a plugin crate (a `.tar.gz`, or a directory, packed without `target/` and hidden
    /// files): built, registered and loaded, all or nothing.
    Install {
        path: PathBuf,
        #[command(flatten)]
        server: Server,
    },
}

/// Exit status: the server could not be reached.
const UNREACHABLE: u8 = 3;

/// Why a command did not succeed.
enum Failure {
    /// No answer (or not one we could read): exit 3.
    Unreachable(String),
    /// The server answered no: exit 1.
    Refused(String),
}

impl From<reqwest::Error> for Failure {
    fn from(e: reqwest::Error) -> Self {
        Failure::Unreachable(e.to_string())
    }
}

/// Runs `command`; prints what it got and returns the exit status.
pub async fn run(command: Remote) -> ExitCode {
    let (Remote::Status { server }
    | Remote::Plugins { server }
    | Remote::Reload { server, .. }
    | Remote::Logs { server, .. }
    | Remote::Install { server, .. }) = &command;
    let client = Client::new(server);
    let result = match command {
        Remote::Status { .. } => status(&client).await,
        Remote::Plugins { .. } => plugins(&client).await,
        Remote::Reload { name, .. } => reload(&client, &name).await,
        Remote::Logs { name, follow, level, limit, .. } => logs(&client, &name, follow, level, limit).await,
        Remote::Install { path, .. } => install(&client, &path).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(message)) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
        Err(Failure::Unreachable(why)) => {
            eprintln!("kiln at {} cannot be reached: {why}", client.base);
            ExitCode::from(UNREACHABLE)
        }
    }
}

/// The admin API of one server.
struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(server: &Server) -> Self {
        let mut addr = server.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Self { http: reqwest::Client::new(), base: format!("http://{addr}"), token: server.token.clone() }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Sends `req`: the status and the JSON body.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, Value), Failure> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }

    /// Sends `req` and expects a success: the body, or the server's error as a refusal.
    async fn expect(&self, req: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let (status, body) = self.send(req).await?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        Err(Failure::Refused(refusal(status, &body)))
    }
}

/// `error: PluginNotFound (404): no plugin named "x"`, from kiln's error shape.
fn refusal(status: u16, body: &Value) -> String {
    let code = body["error"].as_str().unwrap_or("Error");
    let message = body["message"].as_str().map(str::to_string).unwrap_or_else(|| body.to_string());
    format!("error: {code} ({status}): {message}")
}

async fn status(client: &Client) -> Result<(), Failure> {
    let (code, health) = client.send(client.request(reqwest::Method::GET, "/health")).await?;
    let text = |k: &str| health[k].as_str().unwrap_or("?").to_string();
    println!("kiln {} at {}: {}", text("version"), client.base, text("status"));
    println!("  database {}, listener {}", text("database"), text("listener"));
    println!(
        "  {} plugin versions serving, {} builds run, {} passes in progress",
        health["plugins_served"], health["builds_run"], health["reconciling"]
    );
    if let Some(states) = health["plugins"].as_object() {
        let counts: Vec<String> =
            states.iter().filter(|(_, n)| n.as_u64() != Some(0)).map(|(state, n)| format!("{state} {n}")).collect();
        println!("  plugins: {}", if counts.is_empty() { "none".to_string() } else { counts.join(", ") });
    }
    match code {
        200 => Ok(()),
        503 => Err(Failure::Refused("kiln is degraded".into())),
        other => Err(Failure::Refused(refusal(other, &health))),
    }
}

async fn plugins(client: &Client) -> Result<(), Failure> {
    let list = client.expect(client.request(reqwest::Method::GET, "/plugins")).await?;
    let rows: Vec<[String; 5]> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let text = |k: &str| p[k].as_str().unwrap_or("").to_string();
            let error = text("error").lines().next().unwrap_or("").chars().take(80).collect();
            [text("name"), text("version"), text("status"), text("state"), error]
        })
        .collect();
    print!("{}", table(["NAME", "VERSION", "STATUS", "STATE", "ERROR"], &rows));
    Ok(())
}

/// Columns padded to their widest cell; the last one is not padded.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:w$}  "));
            }
        }
        format!("{}\n", out.trim_end())
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

async fn reload(client: &Client, name: &str) -> Result<(), Failure> {
    let path = format!("/plugins/{name}/reload");
    let row = client.expect(client.request(reqwest::Method::POST, &path)).await?;
    println!("{name} {}: {}", row["version"].as_str().unwrap_or("?"), row["state"].as_str().unwrap_or("?"));
    Ok(())
}

/// One log line as a terminal shows it.
fn log_line(line: &Value) -> String {
    let text = |k: &str| line[k].as_str().unwrap_or("").to_string();
    let fields = match &line["fields"] {
        Value::Object(f) if !f.is_empty() => format!(" {}", line["fields"]),
        _ => String::new(),
    };
    let route = line["route"].as_str().map(|r| format!(" [{r}]")).unwrap_or_default();
    format!("{} {:5} {}{route}{fields}", text("at"), text("level"), text("message"))
}

async fn logs(client: &Client, name: &str, follow: bool, level: Option<String>, limit: u32) -> Result<(), Failure> {
    let mut path = format!("/plugins/{name}/logs?limit={limit}");
    if let Some(level) = &level {
        path.push_str(&format!("&level={level}"));
    }
    if !follow {
        let lines = client.expect(client.request(reqwest::Method::GET, &path)).await?;
        for line in lines.as_array().into_iter().flatten() {
            println!("{}", log_line(line));
        }
        return Ok(());
    }
    let resp = client.request(reqwest::Method::GET, &path).header("accept", "text/event-stream").send().await?;
    if !resp.status().is_success() {
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        return Err(Failure::Refused(refusal(status, &body)));
    }
    // Server-sent events: `data:` lines, an empty line ending each event.
    let mut stream = resp.bytes_stream();
    let mut pending = String::new();
    let mut event = String::from("message");
    while let Some(chunk) = stream.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = pending.find('\n') {
            let line = pending[..end].trim_end_matches('\r').to_string();
            pending.drain(..=end);
            if let Some(kind) = line.strip_prefix("event:") {
                event = kind.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                let value: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                match event.as_str() {
                    "lagged" => eprintln!("… {} lines missed (the tail fell behind)", value["missed"]),
                    _ => println!("{}", log_line(&value)),
                }
            } else if line.is_empty() {
                event = "message".into();
            }
        }
    }
    Err(Failure::Unreachable("the server ended the stream".into()))
}

async fn install(client: &Client, path: &std::path::Path) -> Result<(), Failure> {
    let archive = if path.is_dir() {
        let prefix = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "plugin".into());
        let dir = path.to_path_buf();
        tokio::task::spawn_blocking(move || crate::archive::pack(&dir, &prefix))
            .await
            .map_err(|e| Failure::Refused(e.to_string()))?
    } else {
        tokio::fs::read(path).await
    }
    .map_err(|e| Failure::Refused(format!("error: cannot read {}: {e}", path.display())))?;
    let part = reqwest::multipart::Part::bytes(archive).file_name("plugin.tar.gz");
    let form = reqwest::multipart::Form::new().part("file", part);
    let row = client.expect(client.request(reqwest::Method::POST, "/plugins/install").multipart(form)).await?;
    let text = |k: &str| row[k].as_str().unwrap_or("?").to_string();
    println!("installed {} {}: {}", text("name"), text("version"), text("state"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_every_column_but_the_last() {
        let rows = [["hello".to_string(), "1".to_string(), String::new()], ["x".into(), "10".into(), "boom".into()]];
        assert_eq!(table(["NAME", "N", "ERROR"], &rows), "NAME   N   ERROR\nhello  1\nx      10  boom\n");
    }

    #[test]
    fn refusals_name_code_status_and_message() {
        let body = serde_json::json!({ "error": "PluginNotFound", "message": "no plugin named \"x\"" });
        assert_eq!(refusal(404, &body), "error: PluginNotFound (404): no plugin named \"x\"");
        assert_eq!(refusal(502, &Value::String("bad gateway".into())), "error: Error (502): \"bad gateway\"");
    }
}
