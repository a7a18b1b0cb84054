-- Per run and point: per-example epsilon of the per-step sum composition under both
-- accountants side by side, Renyi DP (rule 'rdp') and privacy loss distributions
-- (rule 'pld', `dpledger account --accountant pld`), NULL where a run is not accounted
-- under one of them, and the ratio pld / rdp (below 1: how much the RDP conversion
-- overstates the realised trajectory's epsilon; the PLD number is a tighter
-- description, not a budget to enforce: see README, "Tight accountant (PLD)").
CREATE OR REPLACE VIEW point_epsilon_accountants AS
SELECT coalesce(r.run_id, p.run_id) AS run_id, coalesce(r.point_id, p.point_id) AS point_id,
       r.epsilon AS epsilon_rdp, p.epsilon AS epsilon_pld,
       p.epsilon / nullif(r.epsilon, 0) AS ratio_pld_rdp,
       coalesce(r.delta, p.delta) AS delta,
       coalesce(r.steps_covered, p.steps_covered) AS steps_covered
FROM (SELECT * FROM point_epsilon WHERE rule = 'rdp') r
FULL OUTER JOIN (SELECT * FROM point_epsilon WHERE rule = 'pld') p
     ON p.run_id = r.run_id AND p.point_id = r.point_id;
