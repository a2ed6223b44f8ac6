-- kiln schema: plugins and the endpoints they register.
--
-- A row of `plugins` holds two kinds of columns:
--   desired state, written by users (SQL, the API):  name, source_path, status
--   observed state, written by the server:           state, error, binary_path, path, loaded_hash,
--                                                    loaded_at, description, version, author, type
-- Only changes to desired state notify the server (see the triggers below), so the server's own
-- writes never wake it into another build.

CREATE TABLE plugins (
    id          BIGSERIAL PRIMARY KEY,
    -- The plugin's name: its Cargo package name. Used in URLs, file names and library names.
    name        TEXT NOT NULL UNIQUE
                CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    description TEXT NOT NULL DEFAULT '',
    version     TEXT NOT NULL DEFAULT '',
    author      TEXT NOT NULL DEFAULT '',
    -- Kind of plugin; 'http' is the only kind today.
    type        TEXT NOT NULL DEFAULT 'http',
    -- The manifest (Cargo.toml) the server last read for this plugin.
    path        TEXT,
    -- The library currently loaded (bin/plugins/<name>-<hash>.so), NULL when none.
    binary_path TEXT,
    -- Directory of the plugin's Cargo crate.
    source_path TEXT NOT NULL CHECK (source_path <> ''),
    -- Desired: serve the plugin ('active') or not ('inactive').
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    -- Observed: what the server did with the row last.
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'building', 'loaded', 'inactive', 'failed')),
    -- Observed: why the last attempt failed (compiler diagnostics included). NULL after success.
    -- A failed new version leaves the previous one serving: state stays 'loaded' then.
    error       TEXT,
    -- Observed: content hash of the source the loaded library was built from.
    loaded_hash TEXT,
    loaded_at   TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE plugin_endpoints (
    id         BIGSERIAL PRIMARY KEY,
    plugin_id  BIGINT NOT NULL REFERENCES plugins (id) ON DELETE CASCADE,
    method     TEXT NOT NULL,
    -- OpenAPI-style path, e.g. /powertable/{id}.
    path       TEXT NOT NULL,
    handler    TEXT NOT NULL,
    type       TEXT NOT NULL DEFAULT 'http',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (method, path)
);

CREATE INDEX plugin_endpoints_plugin_id ON plugin_endpoints (plugin_id);

CREATE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER plugins_touch BEFORE UPDATE ON plugins
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
CREATE TRIGGER plugin_endpoints_touch BEFORE UPDATE ON plugin_endpoints
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

-- A hint to the server: "look at plugin <id> again". The payload is small on purpose (NOTIFY
-- payloads are limited to 8000 bytes); the server re-reads the row.
CREATE FUNCTION notify_plugin_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r plugins%ROWTYPE;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('plugin_changes', json_build_object(
        'operation', TG_OP,
        'table', TG_TABLE_NAME,
        'id', r.id,
        'name', r.name,
        'timestamp', clock_timestamp()
    )::text);
    RETURN NULL;
END $$;

CREATE TRIGGER plugins_notify_insert_delete AFTER INSERT OR DELETE ON plugins
    FOR EACH ROW EXECUTE FUNCTION notify_plugin_change();

-- Only desired state notifies: the server's writes of observed state stay quiet.
CREATE TRIGGER plugins_notify_update AFTER UPDATE ON plugins
    FOR EACH ROW
    WHEN ((OLD.name, OLD.source_path, OLD.status) IS DISTINCT FROM (NEW.name, NEW.source_path, NEW.status))
    EXECUTE FUNCTION notify_plugin_change();
