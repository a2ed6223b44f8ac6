//! The transaction a publish happens in: one plugin row held `FOR KEY SHARE` (see
//! [`Repo::lock_row`](super::Repo::lock_row)).

use super::{Loaded, Result, record_not_serving};
use tokio_postgres::types::ToSql;

/// A transaction holding one plugin row `FOR KEY SHARE` (see [`Repo::lock_row`]). Dropped
/// without [`RowLock::commit`], its connection is closed rather than returned to the pool, so the
/// server rolls the transaction back. It writes the observed state of one replica.
pub struct RowLock {
    pub(super) client: Option<deadpool_postgres::Object>,
    pub(super) replica: std::sync::Arc<str>,
}

impl RowLock {
    pub(super) fn client(&self) -> &deadpool_postgres::Object {
        self.client.as_ref().expect("a RowLock has its client until it ends")
    }

    /// Observed, in this transaction: a version of `id` is loaded and serves these endpoints.
    /// Four statements, whatever the number of endpoints (prepared once per connection), sent
    /// together. The plugin's row is written only when its manifest's description changed.
    pub async fn record_loaded(&mut self, id: i64, l: &Loaded<'_>) -> Result<()> {
        let c = self.client();
        let observed = c
            .prepare_cached(
                "INSERT INTO plugin_replicas (plugin_id, replica_id, state, error, path, binary_path, loaded_hash,
                                              loaded_at, updated_at)
                 VALUES ($1, $2, 'loaded', NULL, $3, $4, $5, now(), now())
                 ON CONFLICT (plugin_id, replica_id) DO UPDATE
                 SET state = 'loaded', error = NULL, path = $3, binary_path = $4, loaded_hash = $5, loaded_at = now(),
                     updated_at = now(),
                     restarts = CASE WHEN $6 THEN 0 ELSE plugin_replicas.restarts END,
                     last_crash = CASE WHEN $6 THEN NULL ELSE plugin_replicas.last_crash END",
            )
            .await?;
        let described = c
            .prepare_cached(
                "UPDATE plugins SET description = $2, version = $3, author = $4, type = $5
                 WHERE id = $1 AND (description, version, author, type) IS DISTINCT FROM ($2, $3, $4, $5)",
            )
            .await?;
        let delete = c.prepare_cached("DELETE FROM plugin_endpoints WHERE plugin_id = $1 AND replica_id = $2").await?;
        // In the routes' order: endpoint ids follow it.
        let insert = c
            .prepare_cached(
                "INSERT INTO plugin_endpoints (plugin_id, replica_id, method, path, handler, type)
                 SELECT $1, $2, e.method, e.path, e.handler, $6
                 FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS e(method, path, handler, n)
                 ORDER BY e.n",
            )
            .await?;
        let methods: Vec<&str> = l.endpoints.iter().map(|e| e.method.as_str()).collect();
        let paths: Vec<&str> = l.endpoints.iter().map(|e| e.path.as_str()).collect();
        let handlers: Vec<&str> = l.endpoints.iter().map(|e| e.handler.as_str()).collect();
        let replica: &str = &self.replica;
        // Sent together (tokio-postgres pipelines concurrent requests): one round trip, not
        // four. They run in order; if one fails, the transaction is aborted and so are the rest.
        let observed_params: [&(dyn ToSql + Sync); 6] =
            [&id, &replica, &l.manifest_path, &l.binary_path, &l.hash, &l.fresh];
        let described_params: [&(dyn ToSql + Sync); 5] = [&id, &l.description, &l.version, &l.author, &l.kind];
        if l.keep_endpoints {
            let (a, b) = tokio::join!(c.execute(&observed, &observed_params), c.execute(&described, &described_params));
            return first_error([a, b]);
        }
        let delete_params: [&(dyn ToSql + Sync); 2] = [&id, &replica];
        let insert_params: [&(dyn ToSql + Sync); 6] = [&id, &replica, &methods, &paths, &handlers, &l.kind];
        let (a, b, d, i) = tokio::join!(
            c.execute(&observed, &observed_params),
            c.execute(&described, &described_params),
            c.execute(&delete, &delete_params),
            c.execute(&insert, &insert_params),
        );
        first_error([a, b, d, i])
    }

    /// Observed, in this transaction: plugin `id` serves nothing (`state`, `error`).
    pub async fn record_not_serving(&mut self, id: i64, state: &str, error: &str) -> Result<()> {
        record_not_serving(self.client(), &self.replica, id, state, error).await
    }

    pub async fn commit(mut self) -> Result<()> {
        let client = self.client.take().expect("a RowLock has its client until it ends");
        match client.batch_execute("COMMIT").await {
            Ok(()) => Ok(()),
            Err(e) => {
                drop(deadpool_postgres::Object::take(client));
                Err(e.into())
            }
        }
    }

    /// Ends the transaction without a change.
    pub async fn rollback(mut self) {
        if let Some(client) = self.client.take()
            && client.batch_execute("ROLLBACK").await.is_err()
        {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl Drop for RowLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Still in the transaction: never hand it back to the pool.
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The first error of statements sent together, in the order they ran. Once one fails, the
/// rest fail with "current transaction is aborted", which says nothing of why; `try_join!`
/// returns whichever error it polls first, and it rotates where it starts.
fn first_error<const N: usize>(results: [std::result::Result<u64, tokio_postgres::Error>; N]) -> Result<()> {
    for result in results {
        result?;
    }
    Ok(())
}
