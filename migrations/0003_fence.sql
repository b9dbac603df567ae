-- Fencing of stale partition owners (see README "Offsets, ordering, shutdown"). Each new
-- assignment of a consumed partition claims the next generation before it writes anything;
-- every persist transaction reads its own generation under a share lock and writes nothing
-- when it is no longer current, so an owner that lost its partition cannot write rows.
CREATE TABLE partition_owner (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    generation  bigint NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);
