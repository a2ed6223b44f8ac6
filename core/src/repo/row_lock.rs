//! The transaction a publish happens in: one plugin row held `FOR SHARE` (see
//! [`Repo::lock_row`](super::Repo::lock_row)).

use super::{Loaded, Result, record_not_serving};
use tokio_postgres::types::ToSql;

/// A transaction holding one plugin row `FOR SHARE` (see [`Repo::lock_row`]). Dropped without
/// [`RowLock::commit`], its connection is closed rather than returned to the pool, so the server
/// rolls the transaction back.
pub struct RowLock {
    pub(super) client: Option<deadpool_postgres::Object>,
}

impl RowLock {
    pub(super) fn client(&self) -> &deadpool_postgres::Object {
        self.client.as_ref().expect("a RowLock has its client until it ends")
    }

    /// Observed, in this transaction: a version of `id` is loaded and serves these endpoints.
    /// Three statements, whatever the number of endpoints (prepared once per connection).
    pub async fn record_loaded(&mut self, id: i64, l: &Loaded<'_>) -> Result<()> {
        let c = self.client();
        let update = c
            .prepare_cached(
                "UPDATE plugins SET state = 'loaded', error = NULL, path = $2, binary_path = $3, loaded_hash = $4,
                        loaded_at = now(), description = $5, version = $6, author = $7, type = $8
                 WHERE id = $1",
            )
            .await?;
        let delete = c.prepare_cached("DELETE FROM plugin_endpoints WHERE plugin_id = $1").await?;
        // In the routes' order: endpoint ids follow it.
        let insert = c
            .prepare_cached(
                "INSERT INTO plugin_endpoints (plugin_id, method, path, handler, type)
                 SELECT $1, e.method, e.path, e.handler, $5
                 FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS e(method, path, handler, n)
                 ORDER BY e.n",
            )
            .await?;
        let methods: Vec<&str> = l.endpoints.iter().map(|e| e.method.as_str()).collect();
        let paths: Vec<&str> = l.endpoints.iter().map(|e| e.path.as_str()).collect();
        let handlers: Vec<&str> = l.endpoints.iter().map(|e| e.handler.as_str()).collect();
        // Sent together (tokio-postgres pipelines concurrent requests): one round trip, not
        // three. They run in order; if one fails, the transaction is aborted and so are the rest.
        let update_params: [&(dyn ToSql + Sync); 8] =
            [&id, &l.manifest_path, &l.binary_path, &l.hash, &l.description, &l.version, &l.author, &l.kind];
        if l.keep_endpoints {
            c.execute(&update, &update_params).await?;
            return Ok(());
        }
        let delete_params: [&(dyn ToSql + Sync); 1] = [&id];
        let insert_params: [&(dyn ToSql + Sync); 5] = [&id, &methods, &paths, &handlers, &l.kind];
        tokio::try_join!(
            c.execute(&update, &update_params),
            c.execute(&delete, &delete_params),
            c.execute(&insert, &insert_params),
        )?;
        Ok(())
    }

    /// Observed, in this transaction: plugin `id` serves nothing (`state`, `error`).
    pub async fn record_not_serving(&mut self, id: i64, state: &str, error: &str) -> Result<()> {
        record_not_serving(self.client(), id, state, error).await
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
