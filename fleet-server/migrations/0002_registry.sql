-- The fleet server core: the device registry and its broker credentials,
-- what the latest status said of each device, API tokens, the leader lease,
-- who changed what (fleet events gain an actor), and hourly rollups of the
-- telemetry windows that the API, the dashboard and /metrics read.
--
-- Portable SQL for SQLite and PostgreSQL ({{id}}: an auto-numbered key).

-- Devices provisioned with `rxfleet devices add`. The password is shown
-- once; only its Mosquitto password-file hash (PBKDF2-SHA512) is kept.
CREATE TABLE device_registry (
    device_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    -- The client certificate's serial (hex) when the fleet has a CA.
    cert_serial TEXT,
    retired_ms BIGINT,
    retired_by TEXT
);
CREATE INDEX device_registry_by_site ON device_registry (site);

-- The latest status of a device, as columns to filter and sort on.
ALTER TABLE devices ADD COLUMN daemon_version TEXT;
ALTER TABLE devices ADD COLUMN model_version TEXT;
ALTER TABLE devices ADD COLUMN engine TEXT;
ALTER TABLE devices ADD COLUMN gpu_degraded BIGINT;
ALTER TABLE devices ADD COLUMN engine_fallbacks BIGINT;
ALTER TABLE devices ADD COLUMN outbox_depth BIGINT;
ALTER TABLE devices ADD COLUMN outbox_oldest_unacked_s BIGINT;
-- When the fleet received the latest status (its clock).
ALTER TABLE devices ADD COLUMN status_received_ms BIGINT;
-- An operator reviewed the latest audit chain rewrite.
ALTER TABLE devices ADD COLUMN chain_reviewed_ms BIGINT;
ALTER TABLE devices ADD COLUMN chain_reviewed_by TEXT;

-- Who made a change (`token:NAME`, `cli:USER`); NULL for what the fleet raised itself.
ALTER TABLE fleet_events ADD COLUMN actor TEXT;
CREATE INDEX fleet_events_by_kind ON fleet_events (kind, id);

-- Bearer tokens of the API: only the SHA-256 of the token is kept.
CREATE TABLE api_tokens (
    id {{id}},
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    -- `fleet`, `site:S` or `device:D`: what the token may read.
    scope TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_ms BIGINT,
    revoked_by TEXT
);

-- Leases: one replica leads background work (the ingest …) while it holds
-- the row's lease; `term` grows with every change of holder (fencing).
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);

-- Counters of the fleet (the registry's generation: the broker's password
-- file is rewritten when it moves).
CREATE TABLE fleet_counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO fleet_counters (name, value) VALUES ('registry_generation', 0);

-- Telemetry windows summed per hour (by the hour of a window's end) and
-- model version, for every device (`device:ID`), site (`site:S`) and the
-- fleet (`fleet`). Latency buckets follow the protocol's LATENCY_BOUNDS_MS
-- (lat_12: above the last bound).
CREATE TABLE rollup_hourly (
    scope TEXT NOT NULL,
    hour_ms BIGINT NOT NULL,
    model_version TEXT NOT NULL,
    windows BIGINT NOT NULL,
    scans BIGINT NOT NULL,
    v_match BIGINT NOT NULL,
    v_mismatch BIGINT NOT NULL,
    v_uncertain BIGINT NOT NULL,
    v_identified BIGINT NOT NULL,
    v_no_pill BIGINT NOT NULL,
    v_bad_image BIGINT NOT NULL,
    refusals BIGINT NOT NULL,
    engine_fallbacks BIGINT NOT NULL,
    feedback_confirmed BIGINT NOT NULL,
    feedback_corrected BIGINT NOT NULL,
    confidence_count BIGINT NOT NULL,
    confidence_sum DOUBLE PRECISION NOT NULL,
    latency_count BIGINT NOT NULL,
    latency_sum_ms DOUBLE PRECISION NOT NULL,
    lat_0 BIGINT NOT NULL, lat_1 BIGINT NOT NULL, lat_2 BIGINT NOT NULL, lat_3 BIGINT NOT NULL,
    lat_4 BIGINT NOT NULL, lat_5 BIGINT NOT NULL, lat_6 BIGINT NOT NULL, lat_7 BIGINT NOT NULL,
    lat_8 BIGINT NOT NULL, lat_9 BIGINT NOT NULL, lat_10 BIGINT NOT NULL, lat_11 BIGINT NOT NULL,
    lat_12 BIGINT NOT NULL,
    PRIMARY KEY (scope, hour_ms, model_version)
);
