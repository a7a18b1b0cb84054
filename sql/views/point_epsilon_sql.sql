-- A declared cross-check of the Python path (analysis.composition.epsilon over the
-- composed curves that `dpledger account` stores); tests/test_accounting.py compares them.
-- Per-example epsilon of the fast path computed in SQL alone: the RDP -> (eps, delta)
-- conversion of Balle et al. (2020, Thm. 21), as Opacus's get_privacy_spent, minimised
-- over the orders. Equal to the `point_epsilon` rows of a fast-path rdp accounting
-- (before its 1e-12 rounding margin).
CREATE OR REPLACE VIEW point_epsilon_sql AS
WITH conv AS (
    SELECT f.run_id, f.point_id, f.alpha, a.delta, f.steps_covered,
           f.rdp - (ln(a.delta) + ln(f.alpha)) / (f.alpha - 1) + ln((f.alpha - 1) / f.alpha) AS eps
    FROM point_rdp_fast f JOIN accountings a ON a.run_id = f.run_id AND a.rule = 'rdp'
)
SELECT run_id, point_id, 'rdp' AS rule, min(eps) AS epsilon, arg_min(alpha, eps) AS best_order,
       any_value(delta) AS delta, any_value(steps_covered) AS steps_covered
FROM conv
GROUP BY run_id, point_id;
