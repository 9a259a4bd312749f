-- Signed updates: the TUF repository's metadata and the model registry.

-- Signed metadata files as served at /tuf/metadata/<name>: N.root.json,
-- N.targets.json and N.snapshot.json are kept (clients fetch the versions a
-- timestamp names, and walk the roots); timestamp.json is replaced, forward only.
CREATE TABLE tuf_metadata (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    version BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX tuf_metadata_by_role ON tuf_metadata (role, version);

-- Model versions pushed to the registry. The bundle is stored as a
-- .tar.gz under the artifacts directory by its SHA-256; the TUF target
-- name is <name>-<version>.tar.gz. state: candidate, validated, failed,
-- rolling_out, production, retired (registry::ModelState).
CREATE TABLE model_versions (
    version TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    length BIGINT NOT NULL,
    target TEXT NOT NULL UNIQUE,
    manifest TEXT NOT NULL,
    scan TEXT NOT NULL,
    gate_report TEXT,
    state_reason TEXT NOT NULL,
    pushed_ms BIGINT NOT NULL,
    pushed_by TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- Aliases: production, previous.
CREATE TABLE model_aliases (
    alias TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- Held-out datasets for the validation gates, copied under
-- <datasets_dir>/<hash>/. px_per_mm_milli: the camera scale × 1000 (an
-- integer, portable between SQLite and PostgreSQL); NULL when unknown.
CREATE TABLE datasets (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    images BIGINT NOT NULL,
    products BIGINT NOT NULL,
    px_per_mm_milli BIGINT,
    added_ms BIGINT NOT NULL,
    added_by TEXT NOT NULL
);
