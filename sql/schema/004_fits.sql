-- Approximation fits of per-step privacy-cost curves between recorded checkpoints
-- (analysis/fits.py): what was fitted and how well it predicts held-out checkpoints.
CREATE TABLE fits (
    run_id      VARCHAR NOT NULL,
    method      VARCHAR NOT NULL,   -- step / linear / pchip / offset / nn
    holdout_k   INTEGER NOT NULL,   -- every k-th checkpoint held out; 0 = fitted on all records
    n_points    BIGINT  NOT NULL,
    n_records   BIGINT  NOT NULL,
    params      JSON,               -- the fitted model's parameters (analysis.fits.Fit.params)
    metrics     JSON,               -- holdout errors: per-step cost and per-point epsilon (analysis.fits.holdout)
    computed_at TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (run_id, method, holdout_k)
);
