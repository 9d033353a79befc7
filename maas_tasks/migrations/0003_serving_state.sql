-- Serving state by reconciliation. The registry holds the desired serving state of each model (what every
-- model server must serve); each serving node's agent makes its server converge on it and reports what it
-- observed. The desired state changes only by compare-and-set on its generation, so a promotion gated
-- against one champion can never replace a newer one.

-- A candidate whose champion changed between its gate and its promotion is superseded: recorded, final
-- unless someone rolls to it on purpose. A pinned version is never pruned from a serving volume.
ALTER TABLE model_versions DROP CONSTRAINT model_versions_status_check;
ALTER TABLE model_versions ADD CONSTRAINT model_versions_status_check
    CHECK (status IN ('candidate', 'rejected', 'serving', 'retired', 'superseded'));
ALTER TABLE model_versions ADD COLUMN pinned boolean NOT NULL DEFAULT false;

CREATE TABLE serving_targets (
    model_name     text        PRIMARY KEY REFERENCES model_counters (model_name),
    -- What answers requests that name no version; its model_versions row is 'serving'.
    stable         integer,
    -- A version loaded beside stable (as model "<name>__canary") to be verified before it may become stable;
    -- the promotion holding the slot must finish by canary_until, or the slot is freed.
    canary         integer,
    canary_until   timestamptz,
    -- The stable version before the last change, kept loaded for requests naming it until previous_until.
    previous       integer,
    previous_until timestamptz,
    -- Bumped by every change: nodes report the generation they applied, compare-and-set tests it.
    generation     bigint      NOT NULL DEFAULT 1 CHECK (generation >= 1),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (model_name, stable) REFERENCES model_versions (model_name, version),
    FOREIGN KEY (model_name, canary) REFERENCES model_versions (model_name, version),
    FOREIGN KEY (model_name, previous) REFERENCES model_versions (model_name, version),
    CHECK (canary IS NULL OR stable IS NULL OR canary <> stable),
    CHECK ((canary IS NULL) = (canary_until IS NULL)),
    CHECK ((previous IS NULL) = (previous_until IS NULL))
);

INSERT INTO serving_targets (model_name, stable)
    SELECT model_name, version FROM model_versions WHERE status = 'serving';

-- One row per model server, written by its agent after each reconciliation: where it is, when it last
-- reported, and what it observed (per model: the generation applied, each served version's state, errors).
CREATE TABLE serving_nodes (
    node_id     text        PRIMARY KEY,
    grpc_target text        NOT NULL,
    rest_url    text,
    last_seen   timestamptz NOT NULL DEFAULT now(),
    report      jsonb       NOT NULL DEFAULT '{}'
);
