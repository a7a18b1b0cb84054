-- The coverage rule for SQL users; Python reads the same rule through
-- warehouse/coverage.py (coverage, stream), which a test compares with this view.
-- Every recorded (run, step, point) gradient norm with the number of steps it stands
-- for: until that point's next recorded step, or the run's last step ("hold last").
-- Norms recorded at checkpoints only (every 100-300 steps in GLA-style files) thus
-- cover the whole run; a norm recorded every step covers 1.
--
-- Runs are split by shape so the common cases avoid a per-point window function,
-- which sorts the whole fact table: 'dense' (every point at every step: covers = 1),
-- 'uniform' (every point at the same steps: covers from the run's step list), and
-- 'ragged' (anything else: per-point window).
CREATE OR REPLACE VIEW point_step_coverage AS
WITH shape AS (
    SELECT run_id, count(*) AS n_rows, count(DISTINCT point_id) AS n_points,
           count(DISTINCT step) AS n_steps, min(step) AS first_step, max(step) AS last_step
    FROM point_steps
    GROUP BY run_id
),
kind AS (
    SELECT s.run_id, greatest(coalesce(r.steps, 0), s.last_step + 1) AS run_steps,
           CASE WHEN s.n_rows = s.n_points * s.n_steps AND s.first_step = 0
                     AND s.n_steps = greatest(coalesce(r.steps, 0), s.last_step + 1) THEN 'dense'
                WHEN s.n_rows = s.n_points * s.n_steps THEN 'uniform'
                ELSE 'ragged' END AS shape
    FROM shape s JOIN runs r USING (run_id)
),
uniform_steps AS (
    SELECT run_id, step,
           coalesce(lead(step) OVER (PARTITION BY run_id ORDER BY step), run_steps) - step AS covers
    FROM (SELECT DISTINCT ps.run_id, ps.step, k.run_steps
          FROM point_steps ps JOIN kind k USING (run_id) WHERE k.shape = 'uniform')
)
SELECT ps.run_id, ps.point_id, ps.step, ps.grad_norm, ps.norm_clipped, 1 AS covers, k.shape
FROM point_steps ps JOIN kind k USING (run_id)
WHERE k.shape = 'dense'
UNION ALL
SELECT ps.run_id, ps.point_id, ps.step, ps.grad_norm, ps.norm_clipped, u.covers, k.shape
FROM point_steps ps JOIN kind k USING (run_id) JOIN uniform_steps u USING (run_id, step)
WHERE k.shape = 'uniform'
UNION ALL
SELECT ps.run_id, ps.point_id, ps.step, ps.grad_norm, ps.norm_clipped,
       coalesce(lead(ps.step) OVER (PARTITION BY ps.run_id, ps.point_id ORDER BY ps.step), k.run_steps)
           - ps.step AS covers,
       k.shape
FROM point_steps ps JOIN kind k USING (run_id)
WHERE k.shape = 'ragged';
