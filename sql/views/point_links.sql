-- Per (run, point): per-example epsilon next to input-loss curvature, memorization
-- (estimated from the run's study, else imported for the dataset), the LiRA
-- advantage of the run's study, and the cumulative sample loss.
CREATE OR REPLACE VIEW point_links AS
SELECT pe.run_id, pe.point_id, pe.rule, pe.epsilon, s.study_key, r.config_key, r.dataset, r.target_epsilon,
       p.label, p.attrs,
       c.curvature, c.curvature_score,
       coalesce(me.memorization, mi.score) AS memorization,
       CASE WHEN me.memorization IS NOT NULL THEN 'estimate' WHEN mi.score IS NOT NULL THEN 'imported' END
           AS memorization_source,
       pm.mia_advantage,
       cl.cumulative_loss
FROM point_epsilon pe
JOIN runs r USING (run_id)
JOIN run_study s USING (run_id)
LEFT JOIN points p ON p.dataset = r.dataset AND p.point_id = pe.point_id
LEFT JOIN point_curvature c ON c.run_id = pe.run_id AND c.point_id = pe.point_id
LEFT JOIN memorization_estimate me ON me.study_key = s.study_key AND me.point_id = pe.point_id
     AND me.n_in > 0 AND me.n_out > 0
LEFT JOIN (SELECT dataset, point_id, avg(score) AS score FROM memorization GROUP BY 1, 2) mi
     ON mi.dataset = r.dataset AND mi.point_id = pe.point_id
LEFT JOIN point_mia pm ON pm.study_key = s.study_key AND pm.point_id = pe.point_id
LEFT JOIN point_cumulative_loss cl ON cl.run_id = pe.run_id AND cl.point_id = pe.point_id;
