"""MaaS task library: one module per pipeline stage plus shared config, storage, registry and CLI.

Plain functions with typed arguments, callable and testable without Airflow; the DAGs in ``dags/``
only wire them together.
"""
