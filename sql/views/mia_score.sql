-- Likelihood-ratio membership inference (LiRA, Carlini et al., S&P 2022) per
-- (target run, point). The statistic is the confidence logit
-- phi = log p_y - log sum_{k != y} p_k at the run's final evaluation. The other runs of
-- the study are the shadow models: those that trained on the point ("in") and those
-- that did not ("out") give Gaussians N(mu_in, var_in) and N(mu_out, var_out) of phi
-- (leave-one-out: the target run is never its own shadow).
--   online  = log N(phi; mu_in, var_in) - log N(phi; mu_out, var_out)
--   offline = Phi((phi - mu_out) / sd_out), the one-sided test against the out
--             distribution alone (higher: more likely a member)
-- Variances are floored at 1e-6; with fewer than 2 shadows on a side that side is NULL.
CREATE OR REPLACE VIEW mia_score AS
WITH stats AS (
    SELECT study_key, run_id, point_id, in_train, confidence_logit AS phi
    FROM point_final_eval WHERE confidence_logit IS NOT NULL
),
agg AS (
    SELECT study_key, point_id,
           coalesce(sum(phi) FILTER (WHERE in_train), 0) AS s_in,
           coalesce(sum(phi * phi) FILTER (WHERE in_train), 0) AS ss_in,
           count(*) FILTER (WHERE in_train) AS n_in,
           coalesce(sum(phi) FILTER (WHERE NOT in_train), 0) AS s_out,
           coalesce(sum(phi * phi) FILTER (WHERE NOT in_train), 0) AS ss_out,
           count(*) FILTER (WHERE NOT in_train) AS n_out
    FROM stats GROUP BY study_key, point_id
),
loo AS (
    SELECT t.study_key, t.run_id, t.point_id, t.in_train, t.phi,
           a.n_in - CASE WHEN t.in_train THEN 1 ELSE 0 END AS k_in,
           a.n_out - CASE WHEN t.in_train THEN 0 ELSE 1 END AS k_out,
           a.s_in - CASE WHEN t.in_train THEN t.phi ELSE 0 END AS s_in,
           a.ss_in - CASE WHEN t.in_train THEN t.phi * t.phi ELSE 0 END AS ss_in,
           a.s_out - CASE WHEN t.in_train THEN 0 ELSE t.phi END AS s_out,
           a.ss_out - CASE WHEN t.in_train THEN 0 ELSE t.phi * t.phi END AS ss_out
    FROM stats t JOIN agg a USING (study_key, point_id)
),
moments AS (
    SELECT *,
           CASE WHEN k_in >= 2 THEN s_in / k_in END AS mu_in,
           CASE WHEN k_in >= 2 THEN greatest((ss_in - s_in * s_in / k_in) / (k_in - 1), 1e-6) END AS var_in,
           CASE WHEN k_out >= 2 THEN s_out / k_out END AS mu_out,
           CASE WHEN k_out >= 2 THEN greatest((ss_out - s_out * s_out / k_out) / (k_out - 1), 1e-6) END AS var_out
    FROM loo
)
SELECT study_key, run_id, point_id, in_train, phi AS statistic, mu_in, var_in, mu_out, var_out,
       k_in AS n_shadow_in, k_out AS n_shadow_out,
       (-0.5 * ln(2 * pi() * var_in) - (phi - mu_in) ^ 2 / (2 * var_in))
         - (-0.5 * ln(2 * pi() * var_out) - (phi - mu_out) ^ 2 / (2 * var_out)) AS online_score,
       norm_cdf((phi - mu_out) / sqrt(var_out)) AS offline_score
FROM moments;
