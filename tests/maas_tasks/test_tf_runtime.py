"""TensorFlow starts without its CUDA probe lines on stderr, and everything else it prints still shows."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from maas_tasks.tf_runtime import drop_probe_lines

PROBE_OUTPUT = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795475863.372959    7685 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1795475867.147364    7685 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
E0000 00:00:1795475867.147364    7685 cuda_dnn.cc:8579] Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one has already been registered
I0000 00:00:1795475049.328234    2630 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
I0000 00:00:1796161706.946954    7319 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
"""


def test_only_the_probe_lines_are_dropped():
    real = "E0000 00:00:1.0 1 op_kernel.cc:1] OOM when allocating tensor\nTraceback (most recent call last):\n"
    assert drop_probe_lines(PROBE_OUTPUT) == ""
    assert drop_probe_lines(PROBE_OUTPUT + real) == real
    assert drop_probe_lines(real + PROBE_OUTPUT) == real


def test_importing_tensorflow_prints_nothing_but_what_else_was_written(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys
        from maas_tasks.tf_runtime import import_tensorflow
        tf = import_tensorflow()
        assert import_tensorflow() is tf
        import keras  # already started: silent too
        tf.constant([1.0]) + 1  # first op
        os.write(2, b"a real error line\\n")
        print(tf.__version__)
        """
    )
    # TF_CPP_MIN_LOG_LEVEL unset: the probe lines appear whatever it says, so the test does not lean on it.
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):  # a GPU machine keeps the lines: they are news there
        return
    assert out.stderr == "a real error line\n"
