-- A declared cross-check (with point_rdp_fast and point_epsilon_sql): the SQL twin of
-- analysis.composition.Histogram, which `dpledger account` uses; tests/test_accounting.py
-- compares the chain with the Python path on dense, checkpointed and ragged runs.
-- The fast path's histogram: for each (run, point), the clipped-norm ratios
-- r = min(norm, C) / C of its recorded steps, tent-weighted on the run's grid of
-- `grid_size` cells (accountings, rule 'rdp', not exact), linearly in u = r^2
-- (analysis.grid.tent_weights): with x = r * grid_size and j = floor(x), a step adds
-- (1 - f) to `weight_lo` of bin j and f to `weight_hi` (that is, to bin j + 1), with
-- f = (x^2 - j^2) / (2j + 1), times the steps it covers. Composed RDP is then
-- sum(weight_lo * rho[j] + weight_hi * rho[j + 1]) over the tabulated rdp_grid:
-- a chord of a curve convex in r^2, so an upper bound of the exact sum. (`account`
-- recomputes exactly the few points whose error bound is loose; this chain does not.)
CREATE OR REPLACE VIEW point_r_histogram AS
WITH grid AS (
    SELECT run_id, grid_size FROM accountings WHERE rule = 'rdp' AND NOT exact
),
x AS (
    SELECT c.run_id, c.point_id, c.covers, g.grid_size,
           least(c.grad_norm, r.max_grad_norm) / r.max_grad_norm * g.grid_size AS x
    FROM point_step_coverage c JOIN grid g USING (run_id) JOIN runs r USING (run_id)
),
y AS (
    SELECT run_id, point_id, covers, x, least(floor(x), grid_size - 1) AS j FROM x
),
z AS (
    SELECT run_id, point_id, covers, j, greatest(least((x - j) * (x + j) / (2 * j + 1), 1.0), 0.0) AS f FROM y
)
SELECT run_id, point_id, CAST(j AS INTEGER) AS bin,
       sum((1 - f) * covers) AS weight_lo,
       sum(f * covers) AS weight_hi,
       CAST(sum(covers) AS BIGINT) AS steps
FROM z
GROUP BY run_id, point_id, j;
