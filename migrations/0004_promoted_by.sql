-- Which message's release promoted a key's current head (a parked request it sent on to a
-- retry tier): only that message, redelivered after the release stopped before the forward,
-- resumes the promoted request, so a bystander (a lost commit's redelivery, a re-publish)
-- never settles it beside the live release. NULL for a head parked by its own failure.
ALTER TABLE parked_key ADD COLUMN promoted_by bigint;
