-- The ingest ledger names a file by a tagged content digest instead of a bare SHA-256:
-- 'blake3:<hex>' for files ingested from now on (dpledger.ingest.digest: BLAKE3 hashes
-- about 2.6 times faster than SHA-256 on one core, and ingest steps hashes every file
-- beside a load that keeps every core busy). Rows already recorded keep their SHA-256 as
-- 'sha256:<hex>', and a file ingested before is still found by it (ingest.load.find_ingest),
-- so re-ingesting it stays a no-op. The primary key becomes (digest, kind, target).
ALTER TABLE ingests RENAME COLUMN sha256 TO digest;
UPDATE ingests SET digest = 'sha256:' || digest;
