-- Per-example privacy accounting (DESIGN.md, "Per-example privacy accounting").

-- Runs of one configuration share dataset, model, sample rate, noise multiplier,
-- clipping norm and step count; their per-point costs are compared and averaged.
CREATE MACRO run_config_key(dataset, model, sample_rate, noise_multiplier, max_grad_norm, steps) AS
    concat_ws('|', coalesce(dataset, '?'), coalesce(model, '?'),
              'q=' || coalesce(printf('%.10g', sample_rate), '?'),
              'sigma=' || coalesce(printf('%.10g', noise_multiplier), '?'),
              'C=' || coalesce(printf('%.10g', max_grad_norm), '?'),
              'T=' || coalesce(CAST(steps AS VARCHAR), '?'));

ALTER TABLE runs ADD COLUMN config_key VARCHAR;
UPDATE runs SET config_key = run_config_key(dataset, model, sample_rate, noise_multiplier, max_grad_norm, steps);

-- How each run was accounted: the parameters that the numbers in point_epsilon mean.
CREATE TABLE accountings (
    run_id          VARCHAR NOT NULL,
    rule            VARCHAR NOT NULL,   -- rdp / gla
    delta           DOUBLE  NOT NULL,
    exact           BOOLEAN NOT NULL,   -- false: tabulated grid, an upper bound
    grid_size       INTEGER,            -- cells of r = s/C (fast path)
    orders          DOUBLE[] NOT NULL,  -- RDP orders (rdp) or alpha_0 candidates (gla)
    fill            VARCHAR NOT NULL,   -- how steps between recorded norms are covered
    holder_p        DOUBLE,             -- gla: Hoelder exponent p
    max_order       INTEGER,            -- gla: cap on alpha_i (legacy: 50)
    legacy_scaling  BOOLEAN NOT NULL DEFAULT false,
    bounded_orders  DOUBLE[],           -- fractional orders bounded by the next integer order
    computed_at     TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (run_id, rule)
);

-- Per-example epsilon of one run under one composition rule.
CREATE TABLE point_epsilon (
    run_id         VARCHAR NOT NULL,
    point_id       BIGINT  NOT NULL,
    rule           VARCHAR NOT NULL,
    epsilon        DOUBLE,
    best_order     DOUBLE,
    delta          DOUBLE  NOT NULL,
    exact          BOOLEAN NOT NULL,
    steps_covered  BIGINT  NOT NULL,   -- steps composed (recorded norms and the steps they stand for)
    order_at_edge  BOOLEAN NOT NULL,   -- optimum at the smallest/largest order: more orders may tighten it
    rdp            DOUBLE[],           -- composed RDP at each order of accountings.orders
    PRIMARY KEY (run_id, rule, point_id)
);

-- Per-example epsilon across the runs of one configuration.
CREATE TABLE config_epsilon (
    config_key           VARCHAR NOT NULL,
    rule                 VARCHAR NOT NULL,
    point_id             BIGINT  NOT NULL,
    n_runs               INTEGER NOT NULL,
    epsilon_mean         DOUBLE,
    epsilon_min          DOUBLE,
    epsilon_max          DOUBLE,
    epsilon_expected     DOUBLE,   -- epsilon of the expectation over runs (rdp: mean RDP; gla: log-mean-exp per step)
    best_order_expected  DOUBLE,
    delta                DOUBLE,
    PRIMARY KEY (config_key, rule, point_id)
);

-- The tabulated per-step RDP of the fast path, one row per (order, grid point).
CREATE TABLE rdp_grid (
    sample_rate       DOUBLE  NOT NULL,
    noise_multiplier  DOUBLE  NOT NULL,
    grid_size         INTEGER NOT NULL,
    alpha             DOUBLE  NOT NULL,
    j                 INTEGER NOT NULL,   -- r = j / grid_size
    rho               DOUBLE  NOT NULL,
    bounded           BOOLEAN NOT NULL,   -- column replaced by the next integer order (not convex)
    PRIMARY KEY (sample_rate, noise_multiplier, grid_size, alpha, j)
);
