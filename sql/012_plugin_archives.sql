-- The archive of every plugin installed by upload, so that any replica can unpack, hash and build
-- it: replicas need not share a filesystem. It goes with its plugin's row.
CREATE TABLE plugin_archives (
    plugin_id   BIGINT PRIMARY KEY REFERENCES plugins (id) ON DELETE CASCADE,
    sha256      TEXT NOT NULL,
    size        BIGINT NOT NULL,
    archive     BYTEA NOT NULL,
    -- The replica the upload reached.
    uploaded_by TEXT NOT NULL,
    uploaded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
