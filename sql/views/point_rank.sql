-- Rankings of examples by per-example epsilon within each run and rule (1 = lowest /
-- highest), with the run's data-independent epsilon beside them, and the rank of each
-- example averaged over the runs of its configuration with its spread.
CREATE OR REPLACE VIEW point_rank AS
WITH ranked AS (
    SELECT pe.run_id, pe.point_id, pe.rule, pe.epsilon, pe.best_order, r.config_key, r.dataset,
           rank() OVER (PARTITION BY pe.run_id, pe.rule ORDER BY pe.epsilon ASC, pe.point_id) AS rank_lowest,
           rank() OVER (PARTITION BY pe.run_id, pe.rule ORDER BY pe.epsilon DESC, pe.point_id) AS rank_highest,
           count(*) OVER (PARTITION BY pe.run_id, pe.rule) AS n_points
    FROM point_epsilon pe JOIN runs r USING (run_id)
)
SELECT k.run_id, k.point_id, k.rule, k.epsilon, k.best_order, k.rank_lowest, k.rank_highest, k.n_points,
       re.epsilon AS run_epsilon, k.epsilon / re.epsilon AS ratio,
       p.label,
       avg(k.rank_lowest) OVER (PARTITION BY k.config_key, k.rule, k.point_id) AS mean_rank_lowest,
       stddev_samp(k.rank_lowest) OVER (PARTITION BY k.config_key, k.rule, k.point_id) AS rank_stddev,
       count(*) OVER (PARTITION BY k.config_key, k.rule, k.point_id) AS n_runs
FROM ranked k
JOIN run_epsilon re USING (run_id)
LEFT JOIN points p ON p.dataset = k.dataset AND p.point_id = k.point_id;
