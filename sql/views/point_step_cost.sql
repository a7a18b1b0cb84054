-- The per-step privacy cost each rule composes, at each recorded (run, step, point):
-- rdp: the per-step RDP at the example's optimal order; gla: the Hoelder step term
-- p * log A_{alpha_i} at the order alpha_i of that step for the example's best alpha_0
-- (with legacy scaling: the study's own per-step "Privacy cost"; the UDF gla_ratio is
-- the one definition of that scaling, analysis.gla.sensitivity).
CREATE OR REPLACE VIEW point_step_cost AS
SELECT ps.run_id, ps.point_id, ps.step, pe.rule,
       CASE WHEN pe.rule = 'rdp' THEN
                rdp_step_cost(r.sample_rate, r.noise_multiplier,
                              least(ps.grad_norm, r.max_grad_norm) / r.max_grad_norm, pe.best_order)
            ELSE
                gla_step_cost(r.sample_rate, r.noise_multiplier,
                              gla_ratio(ps.grad_norm, r.max_grad_norm, r.batch_size, a.legacy_scaling),
                              ps.step, pe.best_order, a.holder_p, a.max_order, a.legacy_scaling)
       END AS cost
FROM point_steps ps
JOIN runs r USING (run_id)
JOIN point_epsilon pe ON pe.run_id = ps.run_id AND pe.point_id = ps.point_id
JOIN accountings a ON a.run_id = pe.run_id AND a.rule = pe.rule;
