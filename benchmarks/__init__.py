"""MaaS benchmarks: how long each pipeline stage takes, how good and how calibrated the model is, and how
the served model holds up under load.

``python -m benchmarks`` (``make bench``) runs the library stages directly on a labeled review file, with a
file store in a temporary directory (no Airflow, no PostgreSQL), then puts the exported model under load
side by side: called in process, behind a plain Flask app, and behind the model server over REST and gRPC
(:mod:`benchmarks.serving`), and judges the model server against its targets. It is a tool for people
changing the pipeline or the server, not part of the test suite.
"""
