-- Data in depth: where each snapshot came from, what its validation, quarantine and drift reports say and
-- where they live in the object store, and the watermark of every incrementally read source.
ALTER TABLE data_snapshots
    ADD COLUMN source_uri       text,
    ADD COLUMN schema           jsonb   NOT NULL DEFAULT '{}',
    ADD COLUMN validation       jsonb   NOT NULL DEFAULT '{}',
    ADD COLUMN validation_uri   text,
    ADD COLUMN docs_uri         text,
    ADD COLUMN quarantine_uri   text,
    ADD COLUMN quarantined_rows bigint  NOT NULL DEFAULT 0 CHECK (quarantined_rows >= 0),
    ADD COLUMN drift            jsonb   NOT NULL DEFAULT '{}',
    ADD COLUMN drift_uri        text,
    ADD COLUMN watermark        text;

CREATE INDEX data_snapshots_source_uri ON data_snapshots (source_uri, id);

-- One row per incrementally read source (e.g. a PostgreSQL table): the highest watermark value ingested so
-- far. It moves forward only inside the transaction that records the snapshot holding those rows.
CREATE TABLE source_watermarks (
    source_uri  text        PRIMARY KEY,
    column_name text        NOT NULL,
    value       text        NOT NULL,
    snapshot_id bigint      NOT NULL REFERENCES data_snapshots (id),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
