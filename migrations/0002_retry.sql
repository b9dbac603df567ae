-- Per-key ordering while a request waits in a retry tier (see README "Ordering").
-- parked_key: one row per (input topic, partition, key) whose head request is in a retry tier.
CREATE TABLE parked_key (
    topic        text NOT NULL,
    partition    integer NOT NULL,
    key          bytea NOT NULL,
    -- input offset of the request in the retry tier; the only one that may release the key
    head_offset  bigint NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, key)
);

-- Later requests for a parked key, kept verbatim until the head succeeds or is dead-lettered.
CREATE TABLE parked_message (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    key            bytea NOT NULL,
    source_offset  bigint NOT NULL,
    value          bytea NOT NULL,
    header_names   text[] NOT NULL,
    header_values  bytea[] NOT NULL,
    message_timestamp bigint,
    parked_at      timestamptz NOT NULL DEFAULT now(),
    -- a redelivered follower is parked once
    UNIQUE (topic, partition, source_offset)
);
CREATE INDEX parked_message_key_idx ON parked_message (topic, partition, key, id);

-- One audit row per replayed dead letter; the unique index makes replay at most once per record.
CREATE UNIQUE INDEX audit_log_dead_letter_replayed_idx ON audit_log (entity_id)
    WHERE entity_type = 'dead_letter' AND action = 'replayed';
