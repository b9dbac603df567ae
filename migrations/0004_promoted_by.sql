-- Which consumed record's release promoted a key's current head (a parked request it sent on
-- to a retry tier), as "topic:partition:offset": only that record, redelivered after the
-- release stopped before the forward, resumes the promoted request, so neither a bystander
-- (a lost commit's redelivery, a re-publish) nor the other copy of the releasing message (its
-- input beside its tier copy) settles it beside a live release. `promoted_head` is the head
-- that promotion set: a promotion by an agent from before this migration moves `head_offset`
-- alone, and `promoted_by` counts only while the two agree. NULL for a head parked by its own
-- failure.
SET LOCAL lock_timeout = '10s';
ALTER TABLE parked_key ADD COLUMN promoted_by text, ADD COLUMN promoted_head bigint;
