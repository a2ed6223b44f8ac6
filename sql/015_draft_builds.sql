-- A staged build serves a draft of a version (the plugin crate unoptimized) until its optimized
-- library is built: the history tells the two apart.
ALTER TABLE plugin_builds ADD COLUMN draft BOOLEAN NOT NULL DEFAULT false;
