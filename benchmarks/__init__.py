"""MaaS benchmarks: how long each pipeline stage takes, how good and how calibrated the model is, and how
fast the model server answers.

``python -m benchmarks`` (``make bench``) runs the library stages directly on a labeled review file, with a
file store in a temporary directory (no Airflow, no PostgreSQL), then serves the exported model with
:class:`serving.server.ModelServer` on loopback ports and times REST and gRPC predictions. It is a tool
for people changing the pipeline, not part of the test suite.
"""
