-- The warehouse's tables (DESIGN.md, "Tables"). Names are a contract; columns may grow
-- in later numbered migrations. No PRIMARY KEY on the fact tables: DuckDB keeps ART
-- indexes in memory, which does not scale to billions of point_steps rows, so ingest
-- enforces uniqueness of (run_id, step, point_id) itself (ingest/load.py).

CREATE TABLE runs (
    run_id            VARCHAR PRIMARY KEY,
    dataset           VARCHAR,
    model             VARCHAR,
    seed              BIGINT,
    n_train           BIGINT,
    sample_rate       DOUBLE,    -- q, Poisson sampling rate
    batch_size        BIGINT,    -- expected batch size (q * n_train)
    noise_multiplier  DOUBLE,    -- sigma
    max_grad_norm     DOUBLE,    -- C, clipping norm
    lr                DOUBLE,
    epochs            DOUBLE,
    steps             BIGINT,    -- number of DP-SGD steps of the run
    delta             DOUBLE,
    target_epsilon    DOUBLE,
    private           BOOLEAN,   -- false for --disable-dp baselines
    status            VARCHAR,   -- running / finished / failed
    source            VARCHAR,   -- train / gla-csv / steps
    created_at        TIMESTAMP DEFAULT current_timestamp,
    updated_at        TIMESTAMP DEFAULT current_timestamp,
    config            JSON
);

CREATE TABLE points (
    dataset    VARCHAR NOT NULL,
    point_id   BIGINT  NOT NULL,
    label      BIGINT,
    split      VARCHAR,
    attrs      JSON,
    thumbnail  BLOB,      -- small PNG of the input, for report galleries
    PRIMARY KEY (dataset, point_id)
);

CREATE TABLE membership (
    run_id    VARCHAR NOT NULL,
    point_id  BIGINT  NOT NULL,
    in_train  BOOLEAN NOT NULL,
    PRIMARY KEY (run_id, point_id)
);

CREATE TABLE steps (
    run_id          VARCHAR NOT NULL,
    step            BIGINT  NOT NULL,
    epoch           DOUBLE,
    batch_size      BIGINT,   -- actual (Poisson) batch size
    loss            DOUBLE,
    lr              DOUBLE,
    wall_s          DOUBLE,
    peak_mem_bytes  BIGINT,
    test_accuracy   DOUBLE,   -- at checkpoints
    PRIMARY KEY (run_id, step)
);

-- The fact table, unique on (run_id, step, point_id).
CREATE TABLE point_steps (
    run_id        VARCHAR NOT NULL,
    step          BIGINT  NOT NULL,
    point_id      BIGINT  NOT NULL,
    grad_norm     DOUBLE  NOT NULL, -- L2 norm of the per-example gradient
    norm_clipped  BOOLEAN NOT NULL, -- true: grad_norm was stored already clipped at C
    loss          DOUBLE,
    sampled       BOOLEAN           -- in that step's Poisson batch (NULL: not recorded)
);

CREATE TABLE evaluations (
    run_id    VARCHAR NOT NULL,
    step      BIGINT  NOT NULL,
    point_id  BIGINT  NOT NULL,
    loss      DOUBLE,
    correct   BOOLEAN,
    margin    DOUBLE
);

CREATE TABLE curvature (
    run_id     VARCHAR NOT NULL,
    step       BIGINT  NOT NULL,
    point_id   BIGINT  NOT NULL,
    curvature  DOUBLE,
    n_probes   INTEGER,
    h          DOUBLE
);

CREATE TABLE memorization (
    dataset   VARCHAR NOT NULL,
    point_id  BIGINT  NOT NULL,
    score     DOUBLE,
    source    VARCHAR NOT NULL,
    PRIMARY KEY (dataset, point_id, source)
);

-- One row per imported file or shard; (sha256, kind, target) makes re-ingest a no-op.
CREATE TABLE ingests (
    sha256       VARCHAR NOT NULL,
    kind         VARCHAR NOT NULL,  -- gla-csv / steps / shard / ...
    target       VARCHAR NOT NULL,  -- run name given with --run, '' when taken from the file
    path         VARCHAR NOT NULL,
    rows         BIGINT  NOT NULL,
    run_ids      VARCHAR[],
    ingested_at  TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (sha256, kind, target)
);
