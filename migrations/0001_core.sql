-- Core tables of seed 000's data model, plus the catalogue this service only references,
-- the audit trail and the idempotency ledger.

CREATE TABLE book (
    id          text PRIMARY KEY,
    title       text NOT NULL,
    author      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reader_context (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         text NOT NULL UNIQUE,
    mood            text NOT NULL,
    reader_profile  text NOT NULL,
    interests       text[] NOT NULL DEFAULT '{}',
    intent          text NOT NULL,
    preferences     jsonb,
    -- most recent last; the writer keeps only the last 20 (seed 000 step 2)
    previous_moods  text[] NOT NULL DEFAULT '{}',
    read_books      text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT previous_moods_bounded CHECK (cardinality(previous_moods) <= 20)
);

CREATE TABLE recommendation (
    id               uuid PRIMARY KEY,
    context_id       uuid NOT NULL REFERENCES reader_context (id),
    request_id       text NOT NULL,
    total_score      double precision NOT NULL DEFAULT 0 CHECK (total_score BETWEEN 0 AND 1),
    processing_time  bigint CHECK (processing_time >= 0),
    agents_used      text[] NOT NULL DEFAULT '{}',
    errors           text[] NOT NULL DEFAULT '{}',
    feedback         text,
    feedback_score   integer,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX recommendation_context_idx ON recommendation (context_id, created_at DESC);

CREATE TABLE recommendation_book (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    recommendation_id  uuid NOT NULL REFERENCES recommendation (id),
    book_id            text NOT NULL REFERENCES book (id),
    score              double precision NOT NULL DEFAULT 0 CHECK (score BETWEEN 0 AND 1),
    score_breakdown    jsonb,
    justification      text NOT NULL,
    key_reasons        text[] NOT NULL DEFAULT '{}',
    rank               integer NOT NULL CHECK (rank >= 1),
    created_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT recommendation_book_unique UNIQUE (recommendation_id, book_id)
);
CREATE INDEX recommendation_book_book_idx ON recommendation_book (book_id);

CREATE TABLE audit_log (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity_type  text NOT NULL,
    entity_id    text NOT NULL,
    action       text NOT NULL,
    user_id      text,
    request_id   text,
    new_data     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_entity_idx ON audit_log (entity_type, entity_id);

-- The idempotency ledger: one row per request id, written first in the same transaction as
-- the data, so a redelivered or re-published request is recognised and never written twice.
CREATE TABLE processed_request (
    request_id         text PRIMARY KEY,
    recommendation_id  uuid NOT NULL,
    user_id            text NOT NULL,
    source_topic       text,
    source_partition   integer,
    source_offset      bigint,
    transaction_id     bigint NOT NULL DEFAULT txid_current(),
    -- the confirmation first returned, repeated verbatim for duplicates
    confirmation       jsonb,
    processed_at       timestamptz NOT NULL DEFAULT now()
);
