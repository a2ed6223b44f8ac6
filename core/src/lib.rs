//! kiln: a PostgreSQL-driven runtime plugin host.
//!
//! It discovers plugin crates, compiles them with cargo, loads them through the C ABI of
//! `kiln-types`, records them in PostgreSQL, serves their endpoints beside its admin API, and
//! reacts to edits of the `plugins` table. See ARCHITECTURE.md for the map.

pub mod archive;
pub mod catalog;
pub mod cli;
pub mod compiler;
pub mod config;
pub mod diagnostics;
pub mod discovery;
pub mod error_code;
pub mod events;
pub mod host;
mod http;
pub mod isolation;
pub mod listener;
pub mod load_marker;
pub mod loader;
pub mod local_pg;
pub mod manifest;
pub mod metrics;
pub mod migrate;
pub mod pg_binaries;
pub mod plugin_config;
pub mod plugin_db;
pub mod prebuilt;
pub mod reconciler;
pub mod replica;
pub mod repo;
pub mod routes;
pub mod shared_builds;
pub mod shared_sources;
pub mod staging;
pub mod storm;
pub mod supervisor;
pub mod tree_stamps;
pub mod watcher;

pub use config::Config;

use anyhow::Context;
use compiler::Compiler;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use reconciler::Reconciler;
use repo::Repo;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio_postgres::NoTls;

/// Runs the server on `listener` until `shutdown` completes. `config.database_url` must be set.
///
/// Order: migrate, discover (rows for new plugin crates), then serve while the listener
/// connects, LISTENs and asks for a full resync that loads every active plugin.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut config = config.absolutize().context("resolving paths")?;
    let policy = match &config.config_file {
        Some(f) => config::FileConfig::read(f).with_context(|| format!("reading the config file {}", f.display()))?,
        None => config::FileConfig::default(),
    };
    config.plugin_dirs.extend(policy.plugin_dirs.iter().cloned());
    let policy = Arc::new(policy);
    let url = config.database_url.as_deref().context("no database URL")?;
    let pg: tokio_postgres::Config = url.parse().context("parsing the database URL")?;
    wait_for_database(&pg, config.db_wait()).await?;
    // The heartbeat's own connection: a pool busy with passes (an edit storm) must not delay it
    // past the timeout and have this replica taken for gone.
    let heartbeat_pool = pool(pg.clone(), 1)?;
    let pool = pool(pg.clone(), 16)?;
    migrate::run(&pool).await.context("applying migrations")?;
    let addr = listener.local_addr()?;
    let replica_id = config.replica_id.clone().unwrap_or_else(|| replica::default_id(addr));
    replica::validate_id(&replica_id).map_err(anyhow::Error::msg)?;
    let repo = Repo::new(pool, &replica_id);
    let incarnation = replica::Heartbeat::incarnation();
    let registration = (replica::hostname(), addr.to_string());
    replica::register(&repo, &incarnation, &registration, config.replica_timeout())
        .await
        .context("registering this replica")?;
    repo.reset_observed().await.context("resetting observed state")?;
    discovery::record(&repo, &config.plugin_dirs, &policy).await.context("recording discovered plugins")?;

    let compiler =
        Compiler::new(config.build_dir.clone(), config.bin_dir.clone(), config.types_dir.clone(), config.build_profile)
            .context("preparing the build directories")?;
    let logs: Arc<host::logs::LogStore> = Default::default();
    isolation::set_poll_budget(Duration::from_micros(config.isolation_poll_us.min(1_000)));
    let limits = http::Limits {
        max_body: config.max_body,
        body_timeout: config.request_timeout(),
        default_deadline: Duration::from_millis(config.route_deadline_ms.max(1)),
        blocking_calls: config.blocking_calls_per_plugin as usize,
        server_blocking_calls: config.blocking_calls as usize,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let route_metrics = config.metrics.then(|| metrics.clone());
    let router = Arc::new(http::PluginRouter::new(limits, logs.clone(), route_metrics));
    let markers = load_marker::LoadMarkers::new(config.data_dir.join("loading"));
    record_crashes(&repo, &markers, &logs, &metrics).await?;
    let databases = Arc::new(plugin_db::PluginDatabases::new(pg.clone(), repo.pool().clone()));
    let events = events::EventBus::new(logs.clone(), Duration::from_millis(config.event_timeout_ms.max(1)));
    // What serves is published to the route table and to the event bus alike.
    let sink = Arc::new(routes::Fanout { routes: router.clone(), events: events.clone() });
    let sources = shared_sources::SharedSources::new(repo.clone(), config.install_dir.clone());
    let builds = Arc::new(shared_builds::SharedBuilds::new(repo.clone(), Arc::new(compiler), sources));
    let reconciler = Reconciler::new(
        repo.clone(),
        builds.clone(),
        sink,
        markers,
        databases.clone(),
        reconciler::Reporting {
            logs: logs.clone(),
            events: events.clone(),
            metrics,
            // This very binary, even if its file was replaced since it started (the child
            // speaks the parent's framing, which carries no version).
            host_exe: config.plugin_host_exe.clone().unwrap_or_else(|| "/proc/self/exe".into()),
        },
    );
    // The plugins a start finds are built optimized directly; those added later may draft.
    reconciler.draft_new_plugins_after(repo.max_plugin_id().await.context("reading the plugin ids")?);
    let listener_up = Arc::new(AtomicBool::new(false));
    let api = http::AdminApi {
        repo: repo.clone(),
        reconciler: reconciler.clone(),
        listener_up: listener_up.clone(),
        plugin_dirs: config.plugin_dirs.clone(),
        install_dir: config.install_dir.clone(),
        policy: policy.clone(),
        logs: logs.clone(),
        events: events.clone(),
    };
    let keys = catalog::trust::TrustedKeys::parse(&config.catalog_trusted_keys).map_err(anyhow::Error::msg)?;
    let catalogs = Arc::new(catalog::Catalog::new(repo.clone(), keys));
    repo.add_catalog_sources(&config.catalogs).await.context("recording the catalog sources")?;
    let app = http::app(api, catalogs.clone(), router, config.admin_token.clone(), config.request_timeout())?;

    let retry = events::outbox::Retry {
        first_pause: Duration::from_millis(config.event_retry_ms.max(1)),
        attempts: config.event_attempts.clamp(1, 100) as i32,
    };
    let outbox_task = tokio::spawn(events::outbox::run(repo.clone(), events.clone(), retry));
    let listen_task = tokio::spawn(listener::run(pg, reconciler.clone(), events, listener_up));
    let watch_task = watcher::spawn(config.watch, config.plugin_dirs.clone(), policy, repo.clone(), reconciler.clone());
    let lost = Arc::new(tokio::sync::Notify::new());
    let heartbeat = replica::Heartbeat {
        repo: Repo::new(heartbeat_pool.clone(), &replica_id),
        incarnation: incarnation.clone(),
        registration,
        every: config.heartbeat(),
        timeout: config.replica_timeout(),
        builds,
        reconciler: reconciler.clone(),
        lost: lost.clone(),
    };
    let heartbeat_task = tokio::spawn(heartbeat.run());
    let catalog_task =
        (config.catalog_sync_secs > 0).then(|| catalogs.spawn_periodic(Duration::from_secs(config.catalog_sync_secs)));
    let resync = reconciler.clone();
    let every = config.resync_interval();
    let resync_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            if let Err(e) = resync.resync_all().await {
                tracing::warn!("periodic resync: {e}");
            }
        }
    });

    tracing::info!(%addr, replica = %replica_id, "serving");
    let acceptor =
        http::HeadDeadlineAcceptor::new(poem::listener::TcpAcceptor::from_tokio(listener)?, config.request_timeout());
    let taken = Arc::new(AtomicBool::new(false));
    // What feeds the reconciler: stopped at once when another process took this replica's id,
    // so that no new pass writes rows under an id that is no longer this server's.
    let feeders: Vec<tokio::task::AbortHandle> =
        [Some(&listen_task), Some(&resync_task), Some(&outbox_task), watch_task.as_ref(), catalog_task.as_ref()]
            .into_iter()
            .flatten()
            .map(|t| t.abort_handle())
            .collect();
    let shutdown = {
        let (lost, taken) = (lost.clone(), taken.clone());
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = lost.notified() => {
                    taken.store(true, std::sync::atomic::Ordering::Relaxed);
                    feeders.iter().for_each(tokio::task::AbortHandle::abort);
                }
            }
        }
    };
    let result = poem::Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app, shutdown, Some(Duration::from_secs(10)))
        .await;
    // Shutdown order: stop what feeds the reconciler, then let it finish and retire everything
    // (every instance's cleanup runs once; `serve` returns after the last).
    for task in
        [Some(listen_task), Some(resync_task), Some(outbox_task), Some(heartbeat_task), watch_task, catalog_task]
            .into_iter()
            .flatten()
    {
        task.abort();
        let _ = task.await;
    }
    reconciler.shut_down(Duration::from_secs(30)).await;
    let taken = taken.load(std::sync::atomic::Ordering::Relaxed);
    // The row is another process's now: not marked gone.
    if !taken && let Err(e) = repo.retire_replica(&incarnation).await {
        tracing::warn!("marking this replica gone: {e}");
    }
    // Closed here, not when the database goes away (a private one stops right after): a
    // connection the server ends is logged as an error.
    databases.close();
    heartbeat_pool.close();
    repo.pool().close();
    if taken {
        anyhow::bail!("another process took replica id {replica_id:?}; this server stopped");
    }
    result.context("HTTP server")
}

/// `kiln serve`: binds the address, starts a private PostgreSQL when no database URL is set,
/// and serves until Ctrl-C or SIGTERM. Whatever it started is stopped on every way out.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    // Bind first: a taken port must not leave a freshly started PostgreSQL behind.
    let listener =
        tokio::net::TcpListener::bind(config.addr).await.with_context(|| format!("binding {}", config.addr))?;
    let local = match &config.database_url {
        Some(_) => None,
        None => Some(start_private_postgres(&mut config).await?),
    };
    let result = async {
        if let Some(pg) = &local {
            create_database(&pg.url(), "kiln").await?;
        }
        serve(listener, config, shutdown_signal()).await
    }
    .await;
    if let Some(pg) = local
        && let Err(e) = pg.stop().await
    {
        tracing::warn!("stopping the private PostgreSQL: {e:#}");
    }
    result
}

/// Starts (or attaches to) the private cluster under `config.data_dir` and points
/// `config.database_url` at it.
async fn start_private_postgres(config: &mut Config) -> anyhow::Result<local_pg::LocalPostgres> {
    let dir = config.data_dir.join("pgdata");
    let options = local_pg::Options { ephemeral: false, preferred_port: Some(54329), fallback_root: None };
    let pg = local_pg::LocalPostgres::start(&dir, options)
        .await
        .context("starting the private PostgreSQL (set DATABASE_URL to use your own)")?;
    let url = pg.url_for("kiln");
    let url_file = config.data_dir.join("database-url");
    if let Err(e) = std::fs::write(&url_file, format!("{url}\n")) {
        tracing::warn!("could not write {}: {e}", url_file.display());
    }
    tracing::info!("private PostgreSQL ready; connect with: psql {url}");
    config.database_url = Some(url);
    Ok(pg)
}

/// Waits until PostgreSQL accepts a connection, for at most `patience`: a database that starts
/// after kiln (a container, a machine booting) is waited for, not a reason to exit. Errors that
/// waiting cannot fix (a wrong password, a missing database) end the wait at once.
async fn wait_for_database(pg: &tokio_postgres::Config, patience: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(100);
    let mut logged = false;
    loop {
        match pg.connect(NoTls).await {
            Ok((client, conn)) => {
                drop(client);
                let _ = conn.await;
                if logged {
                    tracing::info!("PostgreSQL accepts connections");
                }
                return Ok(());
            }
            // A server that answered with an error (authentication, unknown database) is up.
            Err(e) if e.as_db_error().is_some() => return Err(e).context("connecting to PostgreSQL"),
            Err(e) if tokio::time::Instant::now() + pause > deadline => {
                return Err(e).with_context(|| format!("PostgreSQL did not accept connections within {patience:?}"));
            }
            Err(e) => {
                if !logged {
                    tracing::info!("waiting up to {patience:?} for PostgreSQL to accept connections: {e}");
                    logged = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Marks every plugin that took the previous process down while it was being loaded (see
/// `load_marker`), so that this start does not load it again.
async fn record_crashes(
    repo: &Repo,
    markers: &load_marker::LoadMarkers,
    logs: &host::logs::LogStore,
    metrics: &metrics::Metrics,
) -> anyhow::Result<()> {
    let last_exit = std::env::var(load_marker::LAST_EXIT_ENV).ok();
    for marker in markers.take_all() {
        let message = load_marker::crash_message(&marker, last_exit.as_deref());
        tracing::error!(plugin = %marker.name, "{message}");
        logs.record(&marker.name, host::logs::Kind::Init, message.clone(), None);
        metrics.crashes.with_label_values(&[marker.name.as_str()]).inc();
        let error = format!("{}: {message}", error_code::ErrorCode::CrashedDuringLoad);
        repo.record_crashed(marker.plugin_id, &marker.hash, &error).await.context("recording a crash during load")?;
    }
    Ok(())
}

/// Creates database `name` unless it exists.
pub async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(admin_url, NoTls).await.context("connecting to PostgreSQL")?;
    let driver = tokio::spawn(conn);
    let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some();
    if !exists {
        // Identifiers cannot be bound as parameters; quote it.
        client.batch_execute(&format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""))).await?;
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}

fn pool(mut pg: tokio_postgres::Config, size: usize) -> anyhow::Result<Pool> {
    // A connection that died silently (a peer gone without a reset) is found and dropped, not
    // waited on for ever: one task publishes every plugin version (`reconciler::publishing`).
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(30));
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let timeout = Some(Duration::from_secs(5));
    Ok(Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .build()?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
