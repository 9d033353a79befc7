-- A DAG run trains one model, so it registers at most one version of it. The index makes a retried
-- evaluate task find the version its first attempt registered instead of allocating another.
CREATE UNIQUE INDEX model_versions_one_per_run
    ON model_versions (model_name, dag_run_id)
    WHERE dag_run_id IS NOT NULL;
