-- A declared cross-check of the Python path (analysis.composition), not what
-- `dpledger account` reads; tests/test_accounting.py compares the two.
-- Composed RDP per (run, point, order) on the fast path, entirely in SQL: the
-- histogram joined to the tabulated grid. `dpledger account` computes the same
-- numbers with a matrix product (much faster for large runs).
CREATE OR REPLACE VIEW point_rdp_fast AS
SELECT h.run_id, h.point_id, g0.alpha,
       sum(h.weight_lo * g0.rho + h.weight_hi * g1.rho) AS rdp,
       CAST(sum(h.steps) AS BIGINT) AS steps_covered
FROM point_r_histogram h
JOIN runs r USING (run_id)
JOIN accountings a ON a.run_id = h.run_id AND a.rule = 'rdp'
JOIN rdp_grid g0 ON g0.sample_rate = r.sample_rate AND g0.noise_multiplier = r.noise_multiplier
                AND g0.grid_size = a.grid_size AND g0.j = h.bin
JOIN rdp_grid g1 ON g1.sample_rate = r.sample_rate AND g1.noise_multiplier = r.noise_multiplier
                AND g1.grid_size = a.grid_size AND g1.alpha = g0.alpha AND g1.j = h.bin + 1
GROUP BY h.run_id, h.point_id, g0.alpha;
