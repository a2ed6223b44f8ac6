-- Durable events: a transactional outbox. Insert a row (in any transaction, with any payload
-- size); once it commits, kiln delivers it to every plugin subscribed to its topic and records
-- the outcome here. A delivery that fails at any subscriber is retried, with doubling pauses,
-- and the row ends `delivered` or, after the last attempt, `dead` with the error kept.
CREATE TABLE events (
    id              BIGSERIAL PRIMARY KEY,
    topic           TEXT NOT NULL
        CHECK (length(topic) <= 200 AND topic ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND topic NOT LIKE 'kiln.%'),
    data            JSONB NOT NULL DEFAULT 'null'::jsonb,
    -- pending: to deliver (again) at next_attempt_at; delivered: every subscriber took it; dead:
    -- the last attempt failed too.
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    -- How many subscriptions matched at the last attempt.
    subscribers     INTEGER,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at    TIMESTAMPTZ
);
CREATE INDEX events_due ON events (next_attempt_at, id) WHERE state = 'pending';

-- One notification per inserting statement (not per row): a bulk insert wakes kiln once.
CREATE FUNCTION notify_events_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kiln_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER events_inserted AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_events_inserted();
