-- The data-independent epsilon of each run (every example at the clipping norm, every
-- step), by the RDP accountant at the run's delta: what per-example epsilons compare to.
-- NULL for a run whose stored parameters lie outside the documented ranges
-- (analysis.validate; `account` refuses such a run with one line naming it).
CREATE OR REPLACE VIEW run_epsilon AS
SELECT run_id, config_key, sample_rate, noise_multiplier, steps, delta,
       CASE WHEN private AND dp_params_valid(sample_rate, noise_multiplier, steps, delta)
            THEN dp_epsilon(sample_rate, noise_multiplier, steps, delta) END AS epsilon,
       CASE WHEN private AND dp_params_valid(sample_rate, noise_multiplier, steps, delta)
            THEN dp_best_order(sample_rate, noise_multiplier, steps, delta) END AS best_order
FROM runs;
