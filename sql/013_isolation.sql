-- Desired: how a plugin runs, over its manifest's `isolation`: 'in_process' or 'process' (a
-- process of its own, so that a crash in it costs only its requests). With process isolation,
-- its memory limit (MiB it may map beyond what the loaded library maps) and CPU-time limit
-- (seconds) over the manifest's `memoryLimitMb` and `cpuLimitSeconds`. NULL: the manifest's.
ALTER TABLE plugins
    ADD COLUMN isolation TEXT CHECK (isolation IN ('in_process', 'process')),
    ADD COLUMN memory_limit_mb INT CHECK (memory_limit_mb > 0),
    ADD COLUMN cpu_limit_s INT CHECK (cpu_limit_s > 0);

-- Observed per replica: restarts of the serving instance's process after crashes, and how it
-- last died (signal or exit code, and its last lines of output).
ALTER TABLE plugin_replicas
    ADD COLUMN restarts INT NOT NULL DEFAULT 0,
    ADD COLUMN last_crash TEXT;

-- The new desired columns notify, and lift a quarantine, like the others.
CREATE OR REPLACE FUNCTION notify_plugins_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Rows whose desired state changed, and both ids of a row whose id changed.
    PERFORM notify_plugin_changes('UPDATE', ARRAY(
        SELECT coalesce(n.id, o.id) AS id
        FROM new_rows n FULL JOIN old_rows o ON o.id = n.id
        WHERE n.id IS NULL OR o.id IS NULL
           OR (o.name, o.source_path, o.status, o.config, o.resources, o.deadline_ms, o.generation,
               o.isolation, o.memory_limit_mb, o.cpu_limit_s)
              IS DISTINCT FROM (n.name, n.source_path, n.status, n.config, n.resources, n.deadline_ms, n.generation,
               n.isolation, n.memory_limit_mb, n.cpu_limit_s)
        ORDER BY 1));
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION plugins_lift_quarantine() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.name, OLD.source_path, OLD.status, OLD.config, OLD.resources, OLD.deadline_ms,
        OLD.isolation, OLD.memory_limit_mb, OLD.cpu_limit_s)
       IS DISTINCT FROM (NEW.name, NEW.source_path, NEW.status, NEW.config, NEW.resources, NEW.deadline_ms,
        NEW.isolation, NEW.memory_limit_mb, NEW.cpu_limit_s) THEN
        NEW.quarantined_hash := NULL;
        NEW.quarantine_reason := NULL;
    END IF;
    RETURN NEW;
END $$;
