-- Rollout evidence: the stage and its control cohort are compared per hour
-- from the devices' rollups of the two model versions.

-- Identified pills with a top-1 probability of at most 0.9 (the confidence
-- histogram's buckets up to 0.9), for the low-confidence gate.
ALTER TABLE rollup_hourly ADD COLUMN confidence_low BIGINT NOT NULL DEFAULT 0;

-- A version's rows since an hour, without reading every scope's history.
CREATE INDEX rollup_hourly_by_version ON rollup_hourly (model_version, hour_ms);

-- Rollouts: a version replacing the previous one stage by stage; at most
-- one active at a time. Plan and state are JSON (rollout::stage::{Plan, State}).
CREATE TABLE rollouts (
    id {{id}},
    model_version TEXT NOT NULL,
    previous_version TEXT NOT NULL,
    plan TEXT NOT NULL,
    state TEXT NOT NULL,
    -- 1 until the state is final (completed, halted, aborted).
    active BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- Every judgement of a stage, with the numbers behind it (JSON: rollout::stage::Decision).
CREATE TABLE rollout_decisions (
    id {{id}},
    rollout_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    stage BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    decision TEXT NOT NULL
);
CREATE INDEX rollout_decisions_by_rollout ON rollout_decisions (rollout_id, id);
-- At most one active rollout, whatever two replicas or admins do at once.
CREATE UNIQUE INDEX rollouts_one_active ON rollouts (active) WHERE active = 1;
