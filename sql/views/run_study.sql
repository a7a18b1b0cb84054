-- Runs grouped into studies for memorization and membership inference: subset-trained
-- runs that differ only in their seed (and so in their random training subset) share a
-- study key. Their sample rates differ with the subset size, which is why this is not
-- config_key.
CREATE OR REPLACE VIEW run_study AS
SELECT run_id, dataset, model,
       concat_ws('|', coalesce(dataset, '?'), coalesce(model, '?'),
                 'subset=' || coalesce(json_extract_string(config, '$.train.subset_ratio'), 'all'),
                 CASE WHEN coalesce(private, true)
                      THEN 'sigma=' || coalesce(printf('%.6g', noise_multiplier), '?') ELSE 'nodp' END,
                 'epochs=' || coalesce(printf('%g', epochs), '?')) AS study_key
FROM runs;
