-- One notification per statement, not per row: `UPDATE plugins SET status = 'inactive'` over
-- 1,000 rows sends one hint naming them all (in chunks of at most 300 ids: 300 ids of 20
-- characters and the rest fit the 8,000-byte payload limit), and the server handles them as one batch.
--
-- A statement that touches one row notifies as before:
--   {"operation": "UPDATE", "table": "plugins", "id": 7, "name": "hello", "timestamp": …}
-- One that touches more names them by id:
--   {"operation": "UPDATE", "table": "plugins", "ids": [7, 8, …], "timestamp": …}
-- Updates notify only for rows whose desired state changed (as the row trigger's WHEN did).

DROP TRIGGER plugins_notify_insert_delete ON plugins;
DROP TRIGGER plugins_notify_update ON plugins;
DROP FUNCTION notify_plugin_change();

CREATE FUNCTION notify_plugin_changes(op TEXT, ids BIGINT[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    chunk CONSTANT INT := 300;
    n INT := coalesce(array_length(ids, 1), 0);
    i INT := 1;
BEGIN
    IF n = 1 THEN
        PERFORM pg_notify('plugin_changes', json_build_object(
            'operation', op,
            'table', 'plugins',
            'id', ids[1],
            'name', (SELECT name FROM plugins WHERE id = ids[1]),
            'timestamp', clock_timestamp()
        )::text);
        RETURN;
    END IF;
    WHILE i <= n LOOP
        PERFORM pg_notify('plugin_changes', json_build_object(
            'operation', op,
            'table', 'plugins',
            'ids', ids[i:i + chunk - 1],
            'timestamp', clock_timestamp()
        )::text);
        i := i + chunk;
    END LOOP;
END $$;

CREATE FUNCTION notify_plugins_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM notify_plugin_changes('INSERT', ARRAY(SELECT id FROM new_rows ORDER BY id));
    RETURN NULL;
END $$;

CREATE FUNCTION notify_plugins_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids BIGINT[] := ARRAY(SELECT id FROM old_rows ORDER BY id);
BEGIN
    IF array_length(ids, 1) = 1 THEN
        -- The row is gone: name it from the transition table.
        PERFORM pg_notify('plugin_changes', json_build_object(
            'operation', 'DELETE',
            'table', 'plugins',
            'id', ids[1],
            'name', (SELECT name FROM old_rows),
            'timestamp', clock_timestamp()
        )::text);
    ELSE
        PERFORM notify_plugin_changes('DELETE', ids);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION notify_plugins_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Rows whose desired state changed, and both ids of a row whose id changed.
    PERFORM notify_plugin_changes('UPDATE', ARRAY(
        SELECT coalesce(n.id, o.id) AS id
        FROM new_rows n FULL JOIN old_rows o ON o.id = n.id
        WHERE n.id IS NULL OR o.id IS NULL
           OR (o.name, o.source_path, o.status, o.config, o.resources, o.deadline_ms)
              IS DISTINCT FROM (n.name, n.source_path, n.status, n.config, n.resources, n.deadline_ms)
        ORDER BY 1));
    RETURN NULL;
END $$;

CREATE TRIGGER plugins_notify_insert AFTER INSERT ON plugins
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_plugins_inserted();
CREATE TRIGGER plugins_notify_delete AFTER DELETE ON plugins
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_plugins_deleted();
CREATE TRIGGER plugins_notify_update AFTER UPDATE ON plugins
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_plugins_updated();
