-- The run snapshot and the journal lines' event and actions as `json`, not
-- `jsonb`. Nothing queries inside them: the store writes them whole and
-- reads them whole (serde), and each group commit rewrites ≈ 2 KiB of
-- snapshot per write. `jsonb` made the server parse that text into its
-- binary form and compress it with pglz on every write, which was half of
-- a 1,000-label cycle's server time; `json` only validates the text (the
-- `->`/`->>` operators still work on it), and lz4 compresses it several
-- times faster than pglz (same space). Measured: BENCHMARKS.md, "Postgres:
-- json columns".
--
-- Processes of an older version keep working beside this schema: their
-- statements cast to `jsonb`, which PostgreSQL assigns to a `json` column,
-- and their reads accept either type.
ALTER TABLE runs ALTER COLUMN snapshot TYPE json USING snapshot::json;
ALTER TABLE transitions
    ALTER COLUMN event TYPE json USING event::json,
    ALTER COLUMN actions TYPE json USING actions::json;

-- lz4 needs PostgreSQL 14 built with it (the Debian and upstream packages
-- are); elsewhere the columns keep the default compression.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE runs ALTER COLUMN snapshot SET COMPRESSION lz4';
    EXECUTE 'ALTER TABLE transitions ALTER COLUMN event SET COMPRESSION lz4, ALTER COLUMN actions SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 compression is not available here: the json columns keep the default compression';
END
$$;
