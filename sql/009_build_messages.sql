-- Each compiler message of a failed build with its place: level, message, code, file, line,
-- column and rendered text (see core/src/diagnostics.rs), beside the text in `diagnostics`.
ALTER TABLE plugin_builds ADD COLUMN messages JSONB NOT NULL DEFAULT '[]';
