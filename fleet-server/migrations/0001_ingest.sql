-- The ingest: devices, every committed device message, telemetry windows,
-- device events, the audit chain heads devices reported, fleet events and
-- counts of refused payloads.
--
-- Portable SQL for SQLite and PostgreSQL. The one dialect difference, an
-- auto-numbered key, is written {{id}} and replaced per backend.
-- Times are Unix milliseconds; JSON is stored as text.

CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    -- Every message of the device with seq <= acked_seq is committed.
    acked_seq BIGINT NOT NULL,
    -- 1 while the retained status says online, 0 after its last will.
    online BIGINT NOT NULL,
    status_ms BIGINT,
    status TEXT,
    -- Incremented when the device's audit chain was found rewritten.
    chain_epoch BIGINT NOT NULL,
    chain_rewritten_ms BIGINT
);

CREATE TABLE device_messages (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    channel TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
);

CREATE TABLE telemetry_windows (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT NOT NULL,
    windows BIGINT NOT NULL,
    model_version TEXT NOT NULL,
    engine TEXT NOT NULL,
    scans BIGINT NOT NULL,
    verdict_match BIGINT NOT NULL,
    verdict_mismatch BIGINT NOT NULL,
    verdict_uncertain BIGINT NOT NULL,
    verdict_identified BIGINT NOT NULL,
    verdict_no_pill BIGINT NOT NULL,
    verdict_bad_image BIGINT NOT NULL,
    refusals BIGINT NOT NULL,
    engine_fallbacks BIGINT NOT NULL,
    feedback_confirmed BIGINT NOT NULL,
    feedback_corrected BIGINT NOT NULL,
    -- The device outbox's cumulative losses at the window's end.
    outbox_merged_windows BIGINT NOT NULL,
    outbox_dropped_windows BIGINT NOT NULL,
    outbox_dropped_events BIGINT NOT NULL,
    audit_next_seq BIGINT NOT NULL,
    audit_head TEXT NOT NULL,
    chain_epoch BIGINT NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX telemetry_windows_by_end ON telemetry_windows (end_ms);

CREATE TABLE device_events (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    details TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
);

CREATE TABLE audit_heads (
    device_id TEXT NOT NULL,
    chain_epoch BIGINT NOT NULL,
    next_seq BIGINT NOT NULL,
    head TEXT NOT NULL,
    source TEXT NOT NULL,
    -- When the device says it was the head (its clock): a status's time, a window's end.
    device_ms BIGINT NOT NULL,
    reported_ms BIGINT NOT NULL,
    PRIMARY KEY (device_id, chain_epoch, next_seq)
);

CREATE TABLE fleet_events (
    id {{id}},
    time_ms BIGINT NOT NULL,
    device_id TEXT,
    kind TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE INDEX fleet_events_by_device ON fleet_events (device_id, time_ms);

CREATE TABLE ingest_rejects (
    device_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    reason TEXT NOT NULL,
    count BIGINT NOT NULL,
    last_ms BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    PRIMARY KEY (device_id, channel, reason)
);
