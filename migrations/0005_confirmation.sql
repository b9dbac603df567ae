-- A request's confirmation, assembled from its ledger row and its audit row. The ledger row is
-- written once, by the insert that gates every write, and holds what is known then; the reader
-- row's id, whether it was created and how long the write took are known only after it, and
-- travel in the audit row, which is written anyway. Storing them with a second write to the
-- ledger row made concurrent batches conflict on it. The persist statements call this for the
-- request written and for a duplicate alike, so both get the same confirmation. A ledger row
-- written before this migration holds the whole confirmation (it names the reader) and is
-- returned as it is. STABLE, as jsonb_build_object is: an IMMUTABLE function whose body is not
-- would not be inlined, and planning its body on every call doubled the statement's cost.
CREATE FUNCTION persistence_confirmation(stored jsonb, recommendation_id uuid, audit jsonb)
RETURNS jsonb LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN stored IS NULL OR stored ? 'contextId' THEN stored
        ELSE stored || jsonb_build_object(
            'recommendationId', recommendation_id::text,
            'contextId', audit ->> 'contextId',
            'persistenceMetadata', (stored -> 'persistenceMetadata') || jsonb_build_object(
                'persistenceTime', (audit ->> 'persistenceTime')::int8,
                'recordsCreated', 1 + (stored -> 'persistenceMetadata' ->> 'booksLinked')::int4
                    + CASE WHEN (audit ->> 'contextCreated')::bool THEN 1 ELSE 0 END))
    END
$$;
COMMENT ON COLUMN processed_request.confirmation IS
    'the confirmation''s fields known at the ledger insert; persistence_confirmation() adds the audit row''s';
