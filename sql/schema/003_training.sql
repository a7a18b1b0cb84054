-- Training workers (ingest/worker.py): progress markers for crash-safe resume,
-- checkpoints for curvature scoring, and the per-point evaluation statistics that
-- membership-inference scores need.

-- The last step whose rows are committed (rows of steps <= committed_step are all in),
-- and the folder holding the run's checkpoints and resume state.
ALTER TABLE runs ADD COLUMN committed_step BIGINT;
ALTER TABLE runs ADD COLUMN run_dir VARCHAR;

-- Time spent computing the tracked points' norms in that step (part of wall_s).
ALTER TABLE steps ADD COLUMN track_s DOUBLE;

-- log p_y - log sum_{k != y} p_k: the LiRA statistic (Carlini et al. 2022) of the point.
ALTER TABLE evaluations ADD COLUMN confidence_logit DOUBLE;

-- Model checkpoints a run saved (state_dict files), e.g. for input-curvature scoring.
CREATE TABLE checkpoints (
    run_id  VARCHAR NOT NULL,
    step    BIGINT  NOT NULL,
    path    VARCHAR NOT NULL,
    PRIMARY KEY (run_id, step)
);
