-- Uninstall that lasts: a discovered plugin whose row is deleted (DELETE /plugins/{name}, or
-- DELETE in SQL) is not discovered again while its crate stays in a plugin directory.
-- Inserting a row for the crate (by hand, or by deleting its tombstone and discovering again)
-- brings it back.

CREATE TABLE plugin_tombstones (
    -- The crate directory of the deleted row: discovery skips it.
    source_path TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    removed_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION plugin_tombstone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.origin = 'discovered' THEN
            INSERT INTO plugin_tombstones (source_path, name) VALUES (OLD.source_path, OLD.name)
            ON CONFLICT (source_path) DO UPDATE SET name = EXCLUDED.name, removed_at = now();
        END IF;
    ELSE
        DELETE FROM plugin_tombstones WHERE source_path = NEW.source_path;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER plugins_tombstone AFTER INSERT OR DELETE ON plugins
    FOR EACH ROW EXECUTE FUNCTION plugin_tombstone();
