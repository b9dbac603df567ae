-- The rights `persistence-agent run` needs, and no more, for a role that already exists and can
-- log in (create it with a password of your own: CREATE ROLE agent LOGIN PASSWORD '…').
-- Run it as the owner of the tables, after `persistence-agent migrate`, and again after any
-- release that adds a migration (docs/security.md):
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -v role=agent -v schema=public -f scripts/agent-role.sql
-- The agent role then runs with MIGRATE_ON_START=false: it cannot create or alter tables, nor
-- touch the catalogue (`book`), nor delete what it wrote.
\set ON_ERROR_STOP 1
GRANT USAGE ON SCHEMA :"schema" TO :"role";
SET search_path = :"schema";
-- The idempotency ledger: the insert gates every write; a duplicate reads its row back.
-- Releases before migration 5 also updated it with the confirmation: a role granted then keeps
-- UPDATE until revoked (docs/security.md), once none of them runs.
GRANT SELECT, INSERT ON processed_request TO :"role";
-- One row per user, upserted (ON CONFLICT DO UPDATE needs SELECT and UPDATE).
GRANT SELECT, INSERT, UPDATE ON reader_context TO :"role";
-- Written once per request; RETURNING reads the new ids.
GRANT SELECT, INSERT ON recommendation TO :"role";
GRANT INSERT ON recommendation_book TO :"role";
-- The audit row holds the rest of the confirmation: RETURNING reads it, a duplicate looks it up.
GRANT SELECT, INSERT ON audit_log TO :"role";
-- Fencing: a claim upserts the partition's generation; each transaction locks it FOR SHARE,
-- which needs UPDATE as well.
GRANT SELECT, INSERT, UPDATE ON partition_owner TO :"role";
-- Per-key ordering: heads and the requests parked behind them come and go.
GRANT SELECT, INSERT, UPDATE, DELETE ON parked_key TO :"role";
GRANT SELECT, INSERT, DELETE ON parked_message TO :"role";
