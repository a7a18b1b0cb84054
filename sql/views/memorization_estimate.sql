-- Feldman-Zhang memorization estimated from the subset-trained runs of one study:
-- mem(i) = P[correct | i in train] - P[correct | i not in train], over the runs'
-- final evaluations, with the number of runs behind each side.
CREATE OR REPLACE VIEW memorization_estimate AS
SELECT study_key, dataset, point_id,
       avg(CASE WHEN in_train THEN correct::DOUBLE END)
         - avg(CASE WHEN NOT in_train THEN correct::DOUBLE END) AS memorization,
       avg(CASE WHEN in_train THEN correct::DOUBLE END) AS p_correct_in,
       avg(CASE WHEN NOT in_train THEN correct::DOUBLE END) AS p_correct_out,
       count(*) FILTER (WHERE in_train) AS n_in,
       count(*) FILTER (WHERE NOT in_train) AS n_out
FROM point_final_eval
GROUP BY study_key, dataset, point_id;
