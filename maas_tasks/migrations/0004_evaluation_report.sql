-- Where each version's evaluation report (an HTML page with its plots, in the object store) lives: written
-- right after the version is registered, rejected versions included, so every gate decision can be reviewed.
ALTER TABLE model_versions ADD COLUMN report_uri text;
