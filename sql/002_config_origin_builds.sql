-- Plugin configuration, where a plugin came from, and the history of its builds.

-- Desired: the plugin's configuration, validated against the configSchema of its manifest.
-- An invalid config is not applied: the row's error says why and the last good one stays.
ALTER TABLE plugins ADD COLUMN config JSONB NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(config) = 'object');

-- How the row came to be: 'discovered' (found in a plugin directory), 'sql' (inserted by a
-- user), 'upload' (installed from an archive; kiln owns its source and deletes it on uninstall).
ALTER TABLE plugins ADD COLUMN origin TEXT NOT NULL DEFAULT 'sql'
    CHECK (origin IN ('discovered', 'sql', 'upload'));

-- A config edit is desired state: it notifies the server too.
DROP TRIGGER plugins_notify_update ON plugins;
CREATE TRIGGER plugins_notify_update AFTER UPDATE ON plugins
    FOR EACH ROW
    WHEN ((OLD.name, OLD.source_path, OLD.status, OLD.config)
          IS DISTINCT FROM (NEW.name, NEW.source_path, NEW.status, NEW.config))
    EXECUTE FUNCTION notify_plugin_change();

-- Every build kiln ran (a build skipped because its library existed is not one).
CREATE TABLE plugin_builds (
    id          BIGSERIAL PRIMARY KEY,
    plugin_id   BIGINT NOT NULL REFERENCES plugins (id) ON DELETE CASCADE,
    source_hash TEXT NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    duration_ms BIGINT NOT NULL,
    success     BOOLEAN NOT NULL,
    -- The compiler's diagnostics of a failed build.
    diagnostics TEXT
);

CREATE INDEX plugin_builds_plugin_id ON plugin_builds (plugin_id, started_at DESC);
