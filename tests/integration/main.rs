//! kiln's integration tests: a real PostgreSQL, real cargo builds of real plugin crates, real
//! HTTP. One test binary (see `support` for the harness).

mod admin_page;
mod author;
mod boundary;
mod catalog;
mod control_plane;
mod crashes;
mod database;
mod db_faults;
mod dependencies;
mod events;
mod faults;
mod host;
mod isolation;
mod lifecycle;
mod metrics;
mod newcomer;
mod operations;
mod overload;
mod quiet;
mod replicas;
mod rollback;
mod scale;
mod support;
mod unload;
mod uploads;
mod watch;
mod zero_drop;
