-- Cumulative sample loss: the sum of a point's recorded training losses, a cheap
-- memorization proxy (high for points the model fits late or never).
CREATE OR REPLACE VIEW point_cumulative_loss AS
SELECT run_id, point_id, sum(loss) AS cumulative_loss, avg(loss) AS mean_loss, count(loss) AS n_steps
FROM point_steps
WHERE loss IS NOT NULL
GROUP BY run_id, point_id;
