-- Rollout evidence: the stage and its control cohort are compared per hour
-- from the devices' rollups of the two model versions.

-- Identified pills with a top-1 probability of at most 0.9 (the confidence
-- histogram's buckets up to 0.9), for the low-confidence gate.
ALTER TABLE rollup_hourly ADD COLUMN confidence_low BIGINT NOT NULL DEFAULT 0;

-- A version's rows since an hour, without reading every scope's history.
CREATE INDEX rollup_hourly_by_version ON rollup_hourly (model_version, hour_ms);
