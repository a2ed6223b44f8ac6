-- Replicas: several kiln servers on one database (see ARCHITECTURE.md, "Replicas").
--
-- The `plugins` row keeps what users want (desired state) and what the plugin's manifest says
-- (name, description, version, author, type). What each replica observed — its state, error,
-- library and loaded hash — lives in `plugin_replicas`, one row per (plugin, replica), written by
-- that replica alone. Endpoint rows are per replica too: they equal what that replica serves.

CREATE TABLE replicas (
    -- Stable across restarts (`--replica-id`; default: host name and port).
    id           TEXT PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$'),
    -- New at every start: a second process that claims a live replica's id is told apart.
    incarnation  TEXT NOT NULL,
    hostname     TEXT NOT NULL DEFAULT '',
    pid          INTEGER,
    -- Which kernel and pid namespace `pid` is a pid of (boot id and namespace inode): only a
    -- process that shares them can tell whether that pid still runs.
    host_identity TEXT NOT NULL DEFAULT '',
    -- Where the replica serves HTTP, as it bound it.
    address      TEXT NOT NULL DEFAULT '',
    kiln_version TEXT NOT NULL DEFAULT '',
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set when the replica stopped, or missed its heartbeats past the timeout; its observed
    -- rows are removed then. NULL while it is live.
    gone_at      TIMESTAMPTZ,
    -- Counters, written with every heartbeat: builds it ran, libraries it fetched from others.
    builds       BIGINT NOT NULL DEFAULT 0,
    fetches      BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE plugin_replicas (
    plugin_id   BIGINT NOT NULL REFERENCES plugins (id) ON DELETE CASCADE,
    replica_id  TEXT NOT NULL REFERENCES replicas (id) ON DELETE CASCADE,
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'building', 'loaded', 'inactive', 'failed', 'waiting')),
    error       TEXT,
    -- The manifest (Cargo.toml) and library this replica loaded, as paths on its own disk.
    path        TEXT,
    binary_path TEXT,
    loaded_hash TEXT,
    loaded_at   TIMESTAMPTZ,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (plugin_id, replica_id)
);
CREATE INDEX plugin_replicas_replica ON plugin_replicas (replica_id);

-- Endpoint rows written by a server before replicas existed have no owner: the next start
-- records them again.
DELETE FROM plugin_endpoints;
ALTER TABLE plugin_endpoints ADD COLUMN replica_id TEXT NOT NULL REFERENCES replicas (id) ON DELETE CASCADE;
ALTER TABLE plugin_endpoints DROP CONSTRAINT plugin_endpoints_method_path_key;
ALTER TABLE plugin_endpoints ADD CONSTRAINT plugin_endpoints_replica_method_path_key UNIQUE (replica_id, method, path);
DROP INDEX plugin_endpoints_plugin_id;
CREATE INDEX plugin_endpoints_plugin_replica ON plugin_endpoints (plugin_id, replica_id);

-- Observed columns move to plugin_replicas. A quarantine stays on the plugin: a version that
-- took one replica down would take the others down too.
ALTER TABLE plugins
    DROP COLUMN state,
    DROP COLUMN error,
    DROP COLUMN path,
    DROP COLUMN binary_path,
    DROP COLUMN loaded_hash,
    DROP COLUMN loaded_at,
    ADD COLUMN quarantine_reason TEXT;

-- Desired: a reload of every replica. `POST /plugins/{name}/reload` (or any UPDATE) raising it
-- has each replica load a fresh instance, as a reload on one server did.
ALTER TABLE plugins ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION notify_plugins_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Rows whose desired state changed, and both ids of a row whose id changed.
    PERFORM notify_plugin_changes('UPDATE', ARRAY(
        SELECT coalesce(n.id, o.id) AS id
        FROM new_rows n FULL JOIN old_rows o ON o.id = n.id
        WHERE n.id IS NULL OR o.id IS NULL
           OR (o.name, o.source_path, o.status, o.config, o.resources, o.deadline_ms, o.generation)
              IS DISTINCT FROM (n.name, n.source_path, n.status, n.config, n.resources, n.deadline_ms, n.generation)
        ORDER BY 1));
    RETURN NULL;
END $$;

-- A reload (a raised generation) does not lift a quarantine: reloading the version that took a
-- server down is refused, as it was before replicas.
CREATE OR REPLACE FUNCTION plugins_lift_quarantine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.name, OLD.source_path, OLD.status, OLD.config, OLD.resources, OLD.deadline_ms)
       IS DISTINCT FROM (NEW.name, NEW.source_path, NEW.status, NEW.config, NEW.resources, NEW.deadline_ms) THEN
        NEW.quarantined_hash := NULL;
        NEW.quarantine_reason := NULL;
    END IF;
    RETURN NEW;
END $$;

-- Builds record which replica ran them.
ALTER TABLE plugin_builds ADD COLUMN replica_id TEXT;

-- Libraries built once and shared: a replica that needs a build another one made fetches it
-- from here and checks its sha256. `build_key` names what decides the output: the plugin's
-- content hash (its sources, kiln-types, the ABI and the build profile), the toolchain and the
-- target. The builder holds an advisory lock on the key while it builds.
CREATE TABLE plugin_libraries (
    build_key   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    source_hash TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    size        BIGINT NOT NULL,
    library     BYTEA NOT NULL,
    built_by    TEXT NOT NULL,
    built_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX plugin_libraries_name ON plugin_libraries (name, built_at);

-- For psql: every plugin with what its live replicas observe, in one line.
--   rollout: 'converged' (every live replica does what the row asks, in one version),
--            'failed' (a replica reports an error), or 'rolling' (some are not there yet).
CREATE VIEW plugin_status AS
SELECT p.id, p.name, p.status,
       CASE WHEN count(o.replica_id) = 0 THEN 'pending'
            WHEN count(DISTINCT o.state) = 1 THEN min(o.state)
            ELSE 'mixed' END AS state,
       CASE WHEN bool_or(o.state = 'failed' OR o.error IS NOT NULL) THEN 'failed'
            WHEN count(o.replica_id) = (SELECT count(*) FROM replicas WHERE gone_at IS NULL)
                 AND bool_and(o.state = CASE p.status WHEN 'active' THEN 'loaded' ELSE 'inactive' END)
                 AND count(DISTINCT o.loaded_hash) <= 1 THEN 'converged'
            ELSE 'rolling' END AS rollout,
       count(o.replica_id) AS replicas,
       count(o.replica_id) FILTER (WHERE o.state = 'loaded') AS serving,
       min(o.error) AS error
FROM plugins p
LEFT JOIN (plugin_replicas o JOIN replicas r ON r.id = o.replica_id AND r.gone_at IS NULL)
       ON o.plugin_id = p.id
GROUP BY p.id;
