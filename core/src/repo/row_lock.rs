//! The transaction a publish happens in: plugin rows held `FOR KEY SHARE` (see
//! [`Repo::lock_rows`](super::Repo::lock_rows)).

use super::{Loaded, Result, record_not_serving};
use tokio_postgres::types::ToSql;

/// A transaction holding plugin rows `FOR KEY SHARE` (see [`Repo::lock_rows`]). Dropped
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
    pub async fn record_loaded(&mut self, id: i64, l: &Loaded<'_>) -> Result<()> {
        self.record_loaded_many(&[(id, l)]).await
    }

    /// Observed, in this transaction: a version of each plugin is loaded and serves its
    /// endpoints. At most five statements, whatever the number of plugins and endpoints
    /// (prepared once per connection), sent together. A plugin's row is written only when its
    /// manifest's description changed.
    pub async fn record_loaded_many(&mut self, all: &[(i64, &Loaded<'_>)]) -> Result<()> {
        let c = self.client();
        let observed = c
            .prepare_cached(
                "INSERT INTO plugin_replicas (plugin_id, replica_id, state, error, path, binary_path, loaded_hash,
                                              loaded_at, updated_at)
                 SELECT u.id, $1, 'loaded', NULL, u.path, u.binary_path, u.hash, now(), now()
                 FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[]) AS u(id, path, binary_path, hash)
                 ON CONFLICT (plugin_id, replica_id) DO UPDATE
                 SET state = 'loaded', error = NULL, path = EXCLUDED.path, binary_path = EXCLUDED.binary_path,
                     loaded_hash = EXCLUDED.loaded_hash, loaded_at = now(), updated_at = now()",
            )
            .await?;
        // A new instance's process starts its restart count and last crash over.
        let fresh = c
            .prepare_cached(
                "UPDATE plugin_replicas SET restarts = 0, last_crash = NULL
                 WHERE replica_id = $1 AND plugin_id = ANY($2) AND (restarts <> 0 OR last_crash IS NOT NULL)",
            )
            .await?;
        let described = c
            .prepare_cached(
                "UPDATE plugins p SET description = u.description, version = u.version, author = u.author, type = u.kind
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
                      AS u(id, description, version, author, kind)
                 WHERE p.id = u.id
                   AND (p.description, p.version, p.author, p.type) IS DISTINCT FROM
                       (u.description, u.version, u.author, u.kind)",
            )
            .await?;
        let delete =
            c.prepare_cached("DELETE FROM plugin_endpoints WHERE replica_id = $1 AND plugin_id = ANY($2)").await?;
        // In the routes' order: endpoint ids follow it.
        let insert = c
            .prepare_cached(
                "INSERT INTO plugin_endpoints (plugin_id, replica_id, method, path, handler, type)
                 SELECT e.id, $1, e.method, e.path, e.handler, e.kind
                 FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])
                      WITH ORDINALITY AS e(id, method, path, handler, kind, n)
                 ORDER BY e.n",
            )
            .await?;
        let ids: Vec<i64> = all.iter().map(|(id, _)| *id).collect();
        let paths: Vec<&str> = all.iter().map(|(_, l)| &*l.manifest_path).collect();
        let binaries: Vec<&str> = all.iter().map(|(_, l)| &*l.binary_path).collect();
        let hashes: Vec<&str> = all.iter().map(|(_, l)| l.hash).collect();
        let fresh_ids: Vec<i64> = all.iter().filter(|(_, l)| l.fresh).map(|(id, _)| *id).collect();
        let descriptions: Vec<&str> = all.iter().map(|(_, l)| l.description).collect();
        let versions: Vec<&str> = all.iter().map(|(_, l)| l.version).collect();
        let authors: Vec<&str> = all.iter().map(|(_, l)| l.author).collect();
        let kinds: Vec<&str> = all.iter().map(|(_, l)| l.kind).collect();
        let rewritten: Vec<&(i64, &Loaded<'_>)> = all.iter().filter(|(_, l)| !l.keep_endpoints).collect();
        let rewritten_ids: Vec<i64> = rewritten.iter().map(|(id, _)| *id).collect();
        let endpoints = || rewritten.iter().flat_map(|(id, l)| l.endpoints.iter().map(move |e| (*id, l.kind, e)));
        let endpoint_ids: Vec<i64> = endpoints().map(|(id, _, _)| id).collect();
        let methods: Vec<&str> = endpoints().map(|(_, _, e)| e.method.as_str()).collect();
        let endpoint_paths: Vec<&str> = endpoints().map(|(_, _, e)| e.path.as_str()).collect();
        let handlers: Vec<&str> = endpoints().map(|(_, _, e)| e.handler.as_str()).collect();
        let endpoint_kinds: Vec<&str> = endpoints().map(|(_, kind, _)| kind).collect();
        let replica: &str = &self.replica;
        // Sent together (tokio-postgres pipelines concurrent requests): one round trip. They run
        // in order; if one fails, the transaction is aborted and so are the rest.
        let observed_params: [&(dyn ToSql + Sync); 5] = [&replica, &ids, &paths, &binaries, &hashes];
        let fresh_params: [&(dyn ToSql + Sync); 2] = [&replica, &fresh_ids];
        let described_params: [&(dyn ToSql + Sync); 5] = [&ids, &descriptions, &versions, &authors, &kinds];
        let delete_params: [&(dyn ToSql + Sync); 2] = [&replica, &rewritten_ids];
        let insert_params: [&(dyn ToSql + Sync); 6] =
            [&replica, &endpoint_ids, &methods, &endpoint_paths, &handlers, &endpoint_kinds];
        // A statement over no rows is not sent.
        let unless_none = |none: bool, statement, params| async move {
            if none { Ok(0) } else { c.execute(statement, params).await }
        };
        let (a, b, d, e, i) = tokio::join!(
            c.execute(&observed, &observed_params),
            unless_none(fresh_ids.is_empty(), &fresh, &fresh_params),
            c.execute(&described, &described_params),
            unless_none(rewritten_ids.is_empty(), &delete, &delete_params),
            unless_none(endpoint_ids.is_empty(), &insert, &insert_params),
        );
        first_error([a, b, d, e, i])
    }

    /// Which of these plugin ids have a row (not locking them).
    pub async fn existing(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let c = self.client();
        let exists = c.prepare_cached("SELECT id FROM plugins WHERE id = ANY($1)").await?;
        Ok(c.query(&exists, &[&ids]).await?.iter().map(|r| r.get(0)).collect())
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
