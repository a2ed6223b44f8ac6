-- Observed: the content hash of a version that took the server down while it was being loaded
-- (its init aborted, crashed or exited). kiln does not load that version again until the row's
-- desired state or the plugin's source changes.
ALTER TABLE plugins ADD COLUMN quarantined_hash TEXT;

-- An edit of desired state lifts the quarantine (a new source lifts it by changing the hash).
CREATE FUNCTION plugins_lift_quarantine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.name, OLD.source_path, OLD.status, OLD.config)
       IS DISTINCT FROM (NEW.name, NEW.source_path, NEW.status, NEW.config) THEN
        NEW.quarantined_hash := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER plugins_lift_quarantine BEFORE UPDATE ON plugins
    FOR EACH ROW EXECUTE FUNCTION plugins_lift_quarantine();
