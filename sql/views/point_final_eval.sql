-- Each run's last evaluation of each point, with whether the point was in that run's
-- training set (runs without a membership table trained on every point).
CREATE OR REPLACE VIEW point_final_eval AS
WITH last AS (
    SELECT run_id, max(step) AS step FROM evaluations GROUP BY run_id
)
SELECT e.run_id, s.study_key, s.dataset, e.point_id, e.step, e.loss, e.correct, e.margin, e.confidence_logit,
       coalesce(m.in_train, true) AS in_train
FROM evaluations e
JOIN last USING (run_id, step)
JOIN run_study s USING (run_id)
LEFT JOIN membership m USING (run_id, point_id);
