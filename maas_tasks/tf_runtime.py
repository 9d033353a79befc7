"""Import TensorFlow once per process, without its CUDA probe chatter on machines that have no GPU.

The full ``tensorflow`` wheel (which tensorflow-serving-api needs) looks for CUDA when it is imported and
again when it first lists devices. On a machine without an NVIDIA driver that writes five lines to the
process's stderr (two "All log messages before absl::InitializeLog()" banners, "Could not find cuda
drivers" twice and "failed call to cuInit") before TensorFlow's log settings apply, so
``TF_CPP_MIN_LOG_LEVEL`` cannot hide them. Airflow records a task's stderr as ERROR, so every TensorFlow
task looked as if it had failed. :func:`import_tensorflow` captures stderr at the file-descriptor level
while TensorFlow starts, then writes back every line except those probe lines, and writes back all of
them when TensorFlow did find a GPU (then they are news). Anything else, a real error included, passes.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from types import ModuleType

# Start-up lines TensorFlow prints on every CPU-only machine (the oneDNN notice on CPUs where its custom
# operations are on). Matched per line, anywhere in it.
_PROBE_LINES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cuda_(dnn|fft|blas)\.cc:\d+\] Unable to register cu\w+ factory"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
)
_lock = threading.Lock()
_started = False


def drop_probe_lines(text: str) -> str:
    """``text`` without the lines TensorFlow prints while it probes for CUDA on a machine without a GPU."""
    return "".join(line for line in text.splitlines(keepends=True) if not _PROBE_LINES.search(line))


def import_tensorflow() -> ModuleType:
    """Import TensorFlow and list its devices, keeping its CUDA probe lines off stderr when there is no GPU.

    Idempotent and thread-safe; call it before the first ``import tensorflow`` or ``import keras`` of a
    process (later calls cost nothing).

    Returns:
        The ``tensorflow`` module.
    """
    global _started
    with _lock:
        if not _started:
            _start_quietly()
            _started = True
    import tensorflow as tf

    return tf


def _start_quietly() -> None:
    has_gpu = True  # if the import fails, every line it printed is kept
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            has_gpu = bool(tf.config.list_physical_devices("GPU"))
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = text if has_gpu else drop_probe_lines(text)
            data = kept.encode("utf-8")
            while data:
                data = data[os.write(2, data):]
