"""TF Serving API conformance: TF Serving's own test cases, over REST and gRPC only, against any model server.

The suite starts the embedded server (``python -m serving.server``) by default; the ``MAAS_CONFORMANCE_*``
settings point it at another server, e.g. a real ``tensorflow_model_server``, so both answer the same cases.
"""
