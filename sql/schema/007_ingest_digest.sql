-- The ingest ledger names a file by a tagged content digest instead of a bare SHA-256:
-- 'blake3:<hex>' for files ingested from now on (dpledger.ingest.digest: BLAKE3 hashes
-- about 2.6 times faster than SHA-256 on one core, and ingest steps hashes every file
-- beside a load that keeps every core busy). Rows already recorded keep their SHA-256 as
-- 'sha256:<hex>', and a file ingested before is still found by it (ingest.load.find_ingest),
-- so re-ingesting it stays a no-op. Rebuilt rather than altered in place: the column is
-- part of the primary key.
CREATE TABLE ingests_007 (
    digest       VARCHAR NOT NULL,  -- 'blake3:<64 hex>'; rows of older ledgers 'sha256:<64 hex>'
    kind         VARCHAR NOT NULL,  -- gla-csv / steps / shard / ...
    target       VARCHAR NOT NULL,  -- run name given with --run, '' when taken from the file
    path         VARCHAR NOT NULL,
    rows         BIGINT  NOT NULL,
    run_ids      VARCHAR[],
    ingested_at  TIMESTAMP DEFAULT current_timestamp,
    PRIMARY KEY (digest, kind, target)
);
INSERT INTO ingests_007 SELECT 'sha256:' || sha256, kind, target, path, rows, run_ids, ingested_at FROM ingests;
DROP TABLE ingests;
ALTER TABLE ingests_007 RENAME TO ingests;
