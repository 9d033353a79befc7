"""The batch scheduler: concurrent requests share session runs, each gets its own rows back, and the
limits of TF Serving's BatchingParameters hold (task size, queue length, allowed batch sizes)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from serving.batching import BatchingOptions, BatchScheduler, read_batching_parameters
from serving.config_protos import ConfigFileError
from serving.servable import ServingError


class DoublingSignature:
    """Stands in for a loaded signature: doubles ``x``, records each run's rows, can be held."""

    name = "serving_default"
    model = "m"
    version = 1

    def __init__(self, hold: threading.Event | None = None, delay: float = 0.0, scalar_output: bool = False) -> None:
        self.runs: list[int] = []
        self.hold = hold
        self.delay = delay
        self.scalar_output = scalar_output
        self.started = threading.Event()

    def run_session(self, inputs, aliases):
        self.started.set()
        if self.hold is not None:
            self.hold.wait(10)
        time.sleep(self.delay)
        self.runs.append(np.shape(inputs["x"])[0] if np.ndim(inputs["x"]) else 1)
        if self.scalar_output:
            return {"y": np.float32(1.0)}
        return {"y": inputs["x"] * 2}


@pytest.fixture
def scheduler_factory():
    made = []

    def make(**options) -> BatchScheduler:
        scheduler = BatchScheduler(BatchingOptions(**options))
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.stop()


def _run_concurrently(scheduler, signature, values: list[list[float]]) -> list:
    results: list = [None] * len(values)

    def call(i: int) -> None:
        try:
            results[i] = scheduler(signature, {"x": np.array(values[i], dtype=np.float32)}, ["y"])["y"].tolist()
        except ServingError as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(values))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_concurrent_requests_share_runs_and_get_their_own_rows(scheduler_factory):
    hold = threading.Event()
    signature = DoublingSignature(hold=hold)
    scheduler = scheduler_factory(max_batch_size=64, num_batch_threads=1, max_enqueued_batches=10)
    first = threading.Thread(target=lambda: scheduler(signature, {"x": np.array([100.0], np.float32)}, ["y"]))
    first.start()
    assert signature.started.wait(5)  # the thread is busy: what arrives now queues up
    values = [[float(i), float(i) + 0.5] for i in range(20)]
    threads_done = []
    runner = threading.Thread(target=lambda: threads_done.append(_run_concurrently(scheduler, signature, values)))
    runner.start()
    time.sleep(0.3)
    hold.set()
    runner.join(10)
    first.join(10)
    assert threads_done[0] == [[2 * a, 2 * b] for a, b in values]
    assert signature.runs[0] == 1 and sum(signature.runs[1:]) == 40
    assert len(signature.runs) <= 3  # 20 requests, 40 rows: one or two batches after the first run


def test_a_lone_request_is_not_delayed_with_a_zero_timeout(scheduler_factory):
    signature = DoublingSignature()
    scheduler = scheduler_factory(max_batch_size=64, num_batch_threads=1, batch_timeout_micros=0)
    started = time.monotonic()
    assert scheduler(signature, {"x": np.array([1.0], np.float32)}, ["y"])["y"].tolist() == [2.0]
    assert time.monotonic() - started < 1.0


def test_a_timeout_gathers_requests_into_one_batch(scheduler_factory):
    signature = DoublingSignature()
    scheduler = scheduler_factory(max_batch_size=100, num_batch_threads=1, batch_timeout_micros=300_000)
    results = _run_concurrently(scheduler, signature, [[1.0], [2.0], [3.0], [4.0]])
    assert results == [[2.0], [4.0], [6.0], [8.0]]
    assert signature.runs == [4]


def test_a_task_over_max_batch_size_is_refused_unless_splitting(scheduler_factory):
    signature = DoublingSignature()
    strict = scheduler_factory(max_batch_size=4)
    with pytest.raises(ServingError, match="Task size 6 is larger than maximum input batch size 4") as info:
        strict(signature, {"x": np.arange(6, dtype=np.float32)}, ["y"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    splitting = scheduler_factory(
        max_batch_size=16, enable_large_batch_splitting=True, max_execution_batch_size=4, max_enqueued_batches=10
    )
    out = splitting(signature, {"x": np.arange(10, dtype=np.float32)}, ["y"])["y"]
    assert out.tolist() == (np.arange(10) * 2).tolist()
    assert max(signature.runs) <= 4 and sum(signature.runs) == 10


def test_a_full_queue_answers_unavailable(scheduler_factory):
    hold = threading.Event()
    signature = DoublingSignature(hold=hold)
    scheduler = scheduler_factory(max_batch_size=2, num_batch_threads=1, max_enqueued_batches=1)
    busy = threading.Thread(target=lambda: scheduler(signature, {"x": np.array([1.0, 2.0], np.float32)}, ["y"]))
    busy.start()
    assert signature.started.wait(5)
    queued = threading.Thread(target=lambda: scheduler(signature, {"x": np.array([3.0, 4.0], np.float32)}, ["y"]))
    queued.start()
    time.sleep(0.2)
    with pytest.raises(ServingError, match="batch scheduling queue to which this task was submitted is full") as info:
        scheduler(signature, {"x": np.array([5.0], np.float32)}, ["y"])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    hold.set()
    busy.join(5)
    queued.join(5)
    # Once the queue drains, the scheduler takes work again.
    assert scheduler(signature, {"x": np.array([5.0], np.float32)}, ["y"])["y"].tolist() == [10.0]


def test_batches_are_padded_to_an_allowed_size(scheduler_factory):
    signature = DoublingSignature()
    scheduler = scheduler_factory(max_batch_size=8, allowed_batch_sizes=(4, 8))
    assert scheduler(signature, {"x": np.array([1.0, 2.0, 3.0], np.float32)}, ["y"])["y"].tolist() == [2.0, 4.0, 6.0]
    assert signature.runs == [4]
    # An empty request runs alone: padding a batch from it would break the requests batched with it.
    assert scheduler(signature, {"x": np.zeros(0, np.float32)}, ["y"])["y"].tolist() == []
    assert signature.runs == [4, 0]


def test_inputs_without_a_batch_dimension_run_alone(scheduler_factory):
    scheduler = scheduler_factory(max_batch_size=8)
    signature = DoublingSignature()
    assert scheduler(signature, {"x": np.float32(1.5)}, ["y"])["y"] == 3.0
    out = scheduler(signature, {"x": np.ones(2, np.float32), "z": np.zeros(3, np.float32)}, ["y"])
    assert out["y"].tolist() == [2.0, 2.0]


def test_outputs_without_a_batch_dimension_fail_the_batch(scheduler_factory):
    scheduler = scheduler_factory(max_batch_size=8)
    with pytest.raises(ServingError, match="Batched output tensor y has 0 dimensions"):  # FAILED_PRECONDITION
        scheduler(DoublingSignature(scalar_output=True), {"x": np.zeros(2, np.float32)}, ["y"])


def test_stopping_fails_queued_requests_with_unavailable(scheduler_factory):
    hold = threading.Event()
    signature = DoublingSignature(hold=hold)
    scheduler = scheduler_factory(max_batch_size=1, num_batch_threads=1, max_enqueued_batches=5)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_run_concurrently(scheduler, signature, [[1.0], [2.0]])))]
    threads[0].start()
    assert signature.started.wait(5)
    time.sleep(0.2)
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    time.sleep(0.1)
    hold.set()
    stopper.join(10)
    threads[0].join(10)
    outcomes = results[0]
    assert [2.0] in outcomes or [4.0] in outcomes
    assert any(isinstance(o, ServingError) and o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes)


def test_batching_parameters_file_is_read_like_tf_serving(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text(
        "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 500 }\n"
        "num_batch_threads { value: 3 }\nmax_enqueued_batches { value: 77 }\nallowed_batch_sizes: 16\n"
        "allowed_batch_sizes: 32\npad_variable_length_inputs: true\n"
    )
    options = read_batching_parameters(path)
    assert (options.max_batch_size, options.batch_timeout_micros, options.num_batch_threads) == (32, 500, 3)
    assert (options.max_enqueued_batches, options.allowed_batch_sizes, options.pad_variable_length_inputs) == (77, (16, 32), True)
    path.write_text("max_batch_size: 32\n")  # a wrapper field written as a scalar
    with pytest.raises(ConfigFileError, match="Error parsing text-format tensorflow.serving.BatchingParameters"):
        read_batching_parameters(path)
    path.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\n")
    with pytest.raises(ValueError, match="must equal max_batch_size"):
        read_batching_parameters(path)
