-- The data-independent epsilon of each run (every example at the clipping norm, every
-- step), by the RDP accountant at the run's delta: what per-example epsilons compare to.
CREATE OR REPLACE VIEW run_epsilon AS
SELECT run_id, config_key, sample_rate, noise_multiplier, steps, delta,
       CASE WHEN private THEN dp_epsilon(sample_rate, noise_multiplier, steps, delta) END AS epsilon,
       CASE WHEN private THEN dp_best_order(sample_rate, noise_multiplier, steps, delta) END AS best_order
FROM runs;
