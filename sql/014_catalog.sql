-- Plugin catalogs: sources (a URL or a directory serving a `catalog.json`) and the entries their
-- last sync found. The server adds the sources it is configured with; operators may add their
-- own rows. A sync replaces a source's entries whole; a failed sync keeps the last good ones and
-- records why.
CREATE TABLE catalog_repositories (
    id         BIGSERIAL PRIMARY KEY,
    url        TEXT NOT NULL UNIQUE CHECK (url <> ''),
    added_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    synced_at  TIMESTAMPTZ,
    -- The last sync's failure (NULL after a good one), and the entries it refused.
    sync_error TEXT,
    refused    JSONB NOT NULL DEFAULT '[]'
);

CREATE TABLE catalog_plugins (
    repository_id BIGINT NOT NULL REFERENCES catalog_repositories (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    description   TEXT NOT NULL DEFAULT '',
    -- Absolute: a relative URL in catalog.json is resolved against the catalog's own.
    archive_url   TEXT NOT NULL,
    sha256        TEXT NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    -- base64 ed25519 signature over the `sha256` text (64 lowercase hex digits); NULL when unsigned.
    signature     TEXT,
    synced_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (repository_id, name, version)
);

CREATE INDEX catalog_plugins_name ON catalog_plugins (name);

-- A plugin installed from a catalog keeps its archive like an upload (plugin_archives).
ALTER TABLE plugins DROP CONSTRAINT plugins_origin_check,
    ADD CONSTRAINT plugins_origin_check CHECK (origin IN ('discovered', 'sql', 'upload', 'catalog'));

-- A replaced archive (an upgrade from a catalog, its roll-back, or an operator's UPDATE) is a
-- change of the plugin's source: every replica passes over the plugin, unpacks the new archive
-- and loads it (the old version serves until the new one does).
CREATE FUNCTION notify_plugin_archive_replaced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.sha256 IS DISTINCT FROM NEW.sha256 THEN
        PERFORM notify_plugin_changes('UPDATE', ARRAY[NEW.plugin_id]);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER plugin_archives_replaced AFTER UPDATE ON plugin_archives
    FOR EACH ROW EXECUTE FUNCTION notify_plugin_archive_replaced();
