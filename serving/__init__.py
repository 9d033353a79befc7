"""MaaS serving side: an embedded model server that speaks TensorFlow Serving's REST and gRPC APIs,
clients for both, TF Serving's model config file, and the promotion of exported versions onto the
serving volume.

The same config files, version directories, clients and promotion code work against the real
``tensorflow/serving`` and against :mod:`serving.server`, which exists because TF Serving's binary
is not always available (no Docker, no prebuilt binary for the platform).
"""
