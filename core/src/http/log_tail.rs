//! The live tail of a plugin's log: `GET /plugins/{name}/logs` with
//! `Accept: text/event-stream` answers server-sent events. The recent lines come first (as the
//! JSON endpoint would give them), then every new line as it is logged, one `log` event each
//! (`id` = its `seq`). A tail that falls behind gets a `lagged` event saying how many it missed.

use super::error::json_error;
use crate::error_code::ErrorCode;
use crate::host::logs::{Level, LogEntry, LogStore};
use crate::repo::Repo;
use futures_util::StreamExt;
use poem::web::sse::{Event, SSE};
use poem::{IntoResponse, Request, Response};
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

/// Lines sent before the live ones.
const RECENT: usize = 100;

/// The plugin name of a `GET /plugins/{name}/logs` request that asks for an event stream.
pub fn wants_tail(req: &Request) -> Option<String> {
    let accept = req.header("accept").unwrap_or("");
    if req.method() != poem::http::Method::GET || !accept.contains("text/event-stream") {
        return None;
    }
    let name = req.uri().path().strip_prefix("/plugins/")?.strip_suffix("/logs")?;
    (!name.contains('/')).then(|| name.to_string())
}

/// The event stream of plugin `name`'s log, at `?level=` or more severe.
pub async fn tail(repo: &Repo, logs: &Arc<LogStore>, req: &Request, name: &str) -> Response {
    if let Err(msg) = crate::manifest::validate_name(name) {
        return json_error(ErrorCode::InvalidName, &msg);
    }
    match repo.get_by_name(name).await {
        Ok(Some(_)) => {}
        Ok(None) => return json_error(ErrorCode::PluginNotFound, &format!("no plugin named {name:?}")),
        Err(e) => return json_error(ErrorCode::from(&e), &e.to_string()),
    }
    let level_param = req.uri().query().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("level="));
    let level = match level_param {
        None => Level::Trace,
        Some(l) => {
            let all = [Level::Error, Level::Warn, Level::Info, Level::Debug, Level::Trace];
            match all.into_iter().find(|level| level.as_str().eq_ignore_ascii_case(l)) {
                Some(level) => level,
                None => return json_error(ErrorCode::BadRequest, "level is one of error, warn, info, debug, trace"),
            }
        }
    };
    // Subscribe before reading the recent lines, so that nothing falls between them.
    let feed = logs.subscribe();
    let recent: Vec<Event> = logs.query(name, level, None, RECENT).iter().map(event).collect();
    let name: Arc<str> = name.into();
    let live = futures_util::stream::unfold(feed, move |mut feed| {
        let name = name.clone();
        async move {
            loop {
                match feed.recv().await {
                    Ok((plugin, entry)) if plugin == name && entry.level <= level => {
                        return Some((event(&entry), feed));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(missed)) => {
                        let e = Event::message(format!("{{\"missed\":{missed}}}")).event_type("lagged");
                        return Some((e, feed));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    SSE::new(futures_util::stream::iter(recent).chain(live))
        .keep_alive(std::time::Duration::from_secs(15))
        .into_response()
}

fn event(e: &LogEntry) -> Event {
    let line = serde_json::json!({
        "seq": e.seq,
        "at": e.at.to_rfc3339(),
        "level": e.level.as_str(),
        "kind": e.kind.as_str(),
        "message": e.message,
        "fields": e.fields,
        "route": e.route,
    });
    Event::message(line.to_string()).id(e.seq.to_string()).event_type("log")
}
