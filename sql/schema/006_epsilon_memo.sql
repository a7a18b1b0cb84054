-- The data-independent epsilon of a mechanism, remembered when a writer stores or
-- changes a run (warehouse.runs.remember_epsilon), so that reads (`dpledger runs`, the
-- run_epsilon view) look it up instead of evaluating the RDP of the sampled Gaussian
-- at every order on every read. A pure function of its key, so a row cannot go stale;
-- rows missing (runs of an older dpledger, live runs of the lake) are computed by
-- the view as before. A dpledger that changes the orders or the conversion clears it
-- in a migration.
CREATE TABLE dp_epsilon_memo (
    sample_rate      DOUBLE NOT NULL,
    noise_multiplier DOUBLE NOT NULL,
    steps            BIGINT NOT NULL,
    delta            DOUBLE NOT NULL,
    epsilon          DOUBLE NOT NULL,
    best_order       DOUBLE NOT NULL,
    PRIMARY KEY (sample_rate, noise_multiplier, steps, delta)
);
