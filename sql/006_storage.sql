-- Each plugin's key-value storage (the host's storage.* calls). It survives reloads and
-- restarts, and goes with the plugin when its row is deleted (uninstall).
CREATE TABLE plugin_storage (
    plugin     TEXT NOT NULL,
    key        TEXT NOT NULL CHECK (key <> '' AND length(key) <= 512),
    value      JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (plugin, key)
);

CREATE TRIGGER plugin_storage_touch BEFORE UPDATE ON plugin_storage
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
