-- Rankings of examples by per-example epsilon within each run and rule (1 = lowest /
-- highest) with SQL's rank(): points of equal epsilon share a rank (equality is exact:
-- points with the same per-step ratios, e.g. clipped at every step, get bit-identical
-- epsilons, and different histograms are different points), and the next rank skips.
-- Beside them: the run's data-independent epsilon, the covered fraction of the run's
-- steps (norms recorded for only part of training make a point's epsilon cover that
-- part only), and the rank of each example averaged over the runs of its configuration
-- with its spread. For rule 'pld' (the PLD accountant of the same per-step sum) run_epsilon
-- and ratio are NULL here: the run's data-independent PLD epsilon is no SQL function
-- (run_epsilon is RDP's); `dpledger rank --accountant pld` fills them in from
-- analysis.pld.data_independent_epsilon_pld.
CREATE OR REPLACE VIEW point_rank AS
WITH ranked AS (
    SELECT pe.run_id, pe.point_id, pe.rule, pe.epsilon, pe.best_order, pe.steps_covered, r.steps, r.config_key,
           r.dataset,
           rank() OVER (PARTITION BY pe.run_id, pe.rule ORDER BY pe.epsilon ASC) AS rank_lowest,
           rank() OVER (PARTITION BY pe.run_id, pe.rule ORDER BY pe.epsilon DESC) AS rank_highest,
           count(*) OVER (PARTITION BY pe.run_id, pe.rule) AS n_points,
           count(*) OVER (PARTITION BY pe.run_id, pe.rule, pe.epsilon) AS n_tied
    FROM point_epsilon pe JOIN runs r USING (run_id)
)
SELECT k.run_id, k.point_id, k.rule, k.epsilon, k.best_order, k.rank_lowest, k.rank_highest, k.n_points, k.n_tied,
       CASE WHEN k.rule <> 'pld' THEN re.epsilon END AS run_epsilon,
       CASE WHEN k.rule <> 'pld' THEN k.epsilon / re.epsilon END AS ratio,
       k.steps_covered, CAST(k.steps_covered AS DOUBLE) / nullif(k.steps, 0) AS covered_fraction,
       p.label,
       avg(k.rank_lowest) OVER (PARTITION BY k.config_key, k.rule, k.point_id) AS mean_rank_lowest,
       stddev_samp(k.rank_lowest) OVER (PARTITION BY k.config_key, k.rule, k.point_id) AS rank_stddev,
       count(*) OVER (PARTITION BY k.config_key, k.rule, k.point_id) AS n_runs
FROM ranked k
JOIN run_epsilon re USING (run_id)
LEFT JOIN points p ON p.dataset = k.dataset AND p.point_id = k.point_id;
