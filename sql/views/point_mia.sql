-- Per point over a study: how much better than chance LiRA tells its membership:
-- the mean offline score when the point was in minus when it was out (a per-example
-- true-positive minus false-positive rate), and the mean online scores of each side.
CREATE OR REPLACE VIEW point_mia AS
SELECT study_key, point_id,
       avg(offline_score) FILTER (WHERE in_train) - avg(offline_score) FILTER (WHERE NOT in_train) AS mia_advantage,
       avg(online_score) FILTER (WHERE in_train) AS online_in,
       avg(online_score) FILTER (WHERE NOT in_train) AS online_out,
       count(*) AS n_runs
FROM mia_score
GROUP BY study_key, point_id;
