-- Observed state 'waiting': refused for now, retried by the server by itself when what it waits
-- for changes (today: a path that an older plugin owns; see ARCHITECTURE.md, path ownership).
ALTER TABLE plugins DROP CONSTRAINT plugins_state_check;
ALTER TABLE plugins ADD CONSTRAINT plugins_state_check
    CHECK (state IN ('pending', 'building', 'loaded', 'inactive', 'failed', 'waiting'));
