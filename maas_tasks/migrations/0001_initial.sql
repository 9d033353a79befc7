-- The model registry: data snapshots, model versions with their lifecycle, and an append-only event log.

CREATE TABLE data_snapshots (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uri         text        NOT NULL,
    sha256      text        NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    rows        bigint      NOT NULL CHECK (rows >= 0),
    source      text        NOT NULL,
    columns     jsonb       NOT NULL DEFAULT '[]',
    metadata    jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per model: the last version handed out. Allocation updates this row inside the
-- transaction that inserts the version, so the row lock serialises allocations and a rollback
-- returns the number.
CREATE TABLE model_counters (
    model_name   text    PRIMARY KEY,
    last_version integer NOT NULL CHECK (last_version >= 1)
);

CREATE TABLE model_versions (
    model_name   text        NOT NULL REFERENCES model_counters (model_name),
    version      integer     NOT NULL CHECK (version >= 1),
    status       text        NOT NULL CHECK (status IN ('candidate', 'rejected', 'serving', 'retired')),
    metrics      jsonb       NOT NULL DEFAULT '{}',
    artifact_uri text,
    snapshot_id  bigint      REFERENCES data_snapshots (id),
    dag_run_id   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, version)
);

-- At most one serving version per model, whatever the application code does.
CREATE UNIQUE INDEX model_versions_one_serving ON model_versions (model_name) WHERE status = 'serving';

CREATE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER model_versions_touch BEFORE UPDATE ON model_versions
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

CREATE TABLE model_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    model_name text,
    version    integer,
    kind       text        NOT NULL,
    detail     jsonb       NOT NULL DEFAULT '{}'
);

CREATE INDEX model_events_model ON model_events (model_name, version);

-- The event log is the audit trail of every promotion: history is only ever appended.
CREATE FUNCTION reject_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'model_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER model_events_append_only BEFORE UPDATE OR DELETE ON model_events
    FOR EACH ROW EXECUTE FUNCTION reject_event_change();

CREATE TRIGGER model_events_no_truncate BEFORE TRUNCATE ON model_events
    FOR EACH STATEMENT EXECUTE FUNCTION reject_event_change();
