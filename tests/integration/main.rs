//! kiln's integration tests: a real PostgreSQL, real cargo builds of real plugin crates, real
//! HTTP. One test binary (see `support` for the harness).

mod faults;
mod lifecycle;
mod quiet;
mod support;
