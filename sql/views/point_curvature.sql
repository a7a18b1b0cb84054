-- Input-loss curvature of each point averaged over the run's scored checkpoints, as
-- Garg et al. and Ravikumar et al. average it across training (each checkpoint's value
-- stays in the curvature table).
CREATE OR REPLACE VIEW point_curvature AS
SELECT run_id, point_id,
       avg(curvature) AS curvature,
       avg(score) AS curvature_score,
       count(*) AS n_checkpoints
FROM curvature
GROUP BY run_id, point_id;
