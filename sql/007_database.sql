-- Scoped database access: each plugin that declares tables gets a schema and a role of its own.

-- Desired: what an operator grants a plugin beyond its own schema (applied on the next pass):
--   {"tables": {"public.users": "read", "public.audit": "write"},   -- read: SELECT; write: + INSERT, UPDATE, DELETE
--    "names":  {"users": "public.users"},                            -- `users` in the plugin's SQL means public.users
--    "connections": 4}                                                -- the role's connection limit (1 to 64)
ALTER TABLE plugins ADD COLUMN resources JSONB NOT NULL DEFAULT '{}'::jsonb
    CHECK (jsonb_typeof(resources) = 'object');

-- Desired: the plugin's route deadline in milliseconds, for routes that set none of their own
-- (NULL: the server's --route-deadline-ms).
ALTER TABLE plugins ADD COLUMN deadline_ms INTEGER
    CHECK (deadline_ms BETWEEN 1 AND 3600000);

-- Both are desired state: an edit notifies the server, and lifts a quarantine.
DROP TRIGGER plugins_notify_update ON plugins;
CREATE TRIGGER plugins_notify_update AFTER UPDATE ON plugins
    FOR EACH ROW
    WHEN ((OLD.name, OLD.source_path, OLD.status, OLD.config, OLD.resources, OLD.deadline_ms)
          IS DISTINCT FROM (NEW.name, NEW.source_path, NEW.status, NEW.config, NEW.resources, NEW.deadline_ms))
    EXECUTE FUNCTION notify_plugin_change();

CREATE OR REPLACE FUNCTION plugins_lift_quarantine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.name, OLD.source_path, OLD.status, OLD.config, OLD.resources, OLD.deadline_ms)
       IS DISTINCT FROM (NEW.name, NEW.source_path, NEW.status, NEW.config, NEW.resources, NEW.deadline_ms) THEN
        NEW.quarantined_hash := NULL;
    END IF;
    RETURN NEW;
END $$;

-- The SQL migrations of plugins (migrations/*.sql in their crates), each applied once, in its
-- plugin's schema under its plugin's role. A file changed after it was applied is refused.
CREATE TABLE plugin_migrations (
    plugin     TEXT NOT NULL,
    name       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (plugin, name)
);
