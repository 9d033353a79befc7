"""Server-side batching (``--enable_batching``), with TF Serving's ``BatchingParameters``.

Many concurrent small requests cost far more as separate session runs than as one: each run has a
fixed overhead, and a batch of 32 texts takes little longer than one. Like TF Serving's
``BatchingSession`` over a ``SharedBatchScheduler``, requests that run the same signature with the
same inputs and outputs are queued together; a batch thread takes up to ``max_batch_size`` rows of
them once the queue is full or the oldest request has waited ``batch_timeout_micros`` (0: as soon as
a thread is free, so a lone request is not delayed), concatenates the inputs along dimension 0, runs
the session once and hands each request its slice of the outputs.

Requests without a common batch dimension (scalar inputs, inputs of different lengths) run alone,
where TF Serving's batching session refuses them. Limits behave as in TF Serving: a request larger than ``max_batch_size`` is refused unless
``enable_large_batch_splitting`` is set (it is then split), and a queue holding
``max_enqueued_batches`` batches refuses more work with UNAVAILABLE, which clients may retry.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving.config_protos import BatchingParameters, read_text_proto
from serving.servable import ServingError, Signature, invalid_argument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingOptions:
    """The scheduler's settings (TF Serving's defaults when no parameters file is given)."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.num_batch_threads < 1:
            raise ValueError(f"num_batch_threads must be at least 1, got {self.num_batch_threads}")
        if self.max_enqueued_batches < 1:
            raise ValueError(f"max_enqueued_batches must be at least 1, got {self.max_enqueued_batches}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must not be negative, got {self.batch_timeout_micros}")
        sizes = list(self.allowed_batch_sizes)
        if sizes:
            if sizes != sorted(set(sizes)) or sizes[0] < 1:
                raise ValueError(f"allowed_batch_sizes must be increasing positive sizes, got {sizes}")
            if sizes[-1] != self.execution_batch_size:
                raise ValueError(
                    f"the last entry of allowed_batch_sizes ({sizes[-1]}) must equal max_batch_size "
                    f"({self.execution_batch_size})"
                )

    @property
    def execution_batch_size(self) -> int:
        """The largest batch one session run takes."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size:
            return self.max_execution_batch_size
        return self.max_batch_size


def read_batching_parameters(path: Path | None) -> BatchingOptions:
    """The options a ``--batching_parameters_file`` gives (TF Serving's defaults for unset fields).

    Raises:
        ConfigFileError: the file cannot be read or parsed.
        ValueError: a value is out of range.
    """
    if path is None:
        return BatchingOptions()
    params = read_text_proto(path, BatchingParameters, "batching_parameters_file")
    defaults = BatchingOptions()

    def value(name: str, default):
        return getattr(params, name).value if params.HasField(name) else default

    return BatchingOptions(
        max_batch_size=value("max_batch_size", defaults.max_batch_size),
        batch_timeout_micros=value("batch_timeout_micros", defaults.batch_timeout_micros),
        max_enqueued_batches=value("max_enqueued_batches", defaults.max_enqueued_batches),
        num_batch_threads=value("num_batch_threads", defaults.num_batch_threads),
        allowed_batch_sizes=tuple(params.allowed_batch_sizes),
        pad_variable_length_inputs=params.pad_variable_length_inputs,
        enable_large_batch_splitting=value("enable_large_batch_splitting", False),
        max_execution_batch_size=value("max_execution_batch_size", 0),
    )


@dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    size: int
    future: Any  # a concurrent.futures.Future, or an asyncio future of ``loop``
    enqueued: float
    loop: Any = None

    def claim(self) -> bool:
        """Mark the task as running; False when its caller gave up on it (cancelled) while it queued."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.cancelled()


@dataclass
class _Queue:
    signature: Signature
    aliases: list[str]
    tasks: deque = field(default_factory=deque)
    rows: int = 0


class BatchScheduler:
    """Batches concurrent session runs of the same signature; shared by every loaded version.

    ``observe_batch(signature, rows)`` is called after each batch runs (for metrics).
    """

    def __init__(self, options: BatchingOptions, observe_batch: Callable[[Signature, int], None] | None = None) -> None:
        self.options = options
        self._observe = observe_batch
        self._cond = threading.Condition()
        self._queues: dict[tuple, _Queue] = {}
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"model-server-batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def __call__(self, signature: Signature, inputs: dict[str, np.ndarray], aliases: list[str]) -> dict[str, np.ndarray]:
        """Run ``signature`` on ``inputs`` within a batch and return this request's outputs.

        Raises:
            ServingError: INVALID_ARGUMENT for inputs that cannot be batched or a task over the
                size limit; UNAVAILABLE when the queue is full or the scheduler stopped; the run's
                own error.
        """
        future = self.submit(signature, inputs, aliases)
        if future is None:
            return signature.run_session(inputs, aliases)
        return future.result()

    def submit(
        self, signature: Signature, inputs: dict[str, np.ndarray], aliases: list[str], loop: Any = None
    ) -> Any:
        """Queue a request; the future gives its outputs. With ``loop`` (called from that event loop), it
        is an asyncio future, settled once per batch on the loop, so waiting holds no thread. None when the
        request has no batch dimension to concatenate along (scalars, inputs of different lengths): TF
        Serving's batching session refuses those, the caller runs them alone instead; so it does for a
        split-size task waited on from a loop.

        Raises:
            ServingError: INVALID_ARGUMENT for a task over the size limit; UNAVAILABLE when the queue is
                full or the scheduler stopped.
        """
        sizes = {alias: (value.shape[0] if value.ndim else None) for alias, value in inputs.items()}
        if not inputs or None in sizes.values() or len(set(sizes.values())) != 1:
            return None
        size = next(iter(sizes.values()))
        if size == 0:
            return None  # nothing to batch; padding a batch from an empty task would break its neighbours
        if size > self.options.max_batch_size:
            raise invalid_argument(f"Task size {size} is larger than maximum input batch size {self.options.max_batch_size}")
        limit = self.options.execution_batch_size
        if size <= limit:
            return self._submit(signature, inputs, aliases, size, loop)
        if loop is not None:
            return None
        parts = [
            self._submit(signature, {k: v[start : start + limit] for k, v in inputs.items()}, aliases, min(limit, size - start))
            for start in range(0, size, limit)
        ]
        return _joined(parts, aliases)

    def stop(self) -> None:
        """Stop the batch threads; queued requests fail with UNAVAILABLE."""
        with self._cond:
            self._stopping = True
            pending = [task for queue in self._queues.values() for task in queue.tasks]
            self._queues.clear()
            self._cond.notify_all()
        shutting_down = ServingError(grpc.StatusCode.UNAVAILABLE, "The model server is shutting down")
        _deliver([t for t in pending if t.claim()], None, shutting_down)
        for thread in self._threads:
            thread.join(timeout=5)

    def _submit(
        self, signature: Signature, inputs: dict[str, np.ndarray], aliases: list[str], size: int, loop: Any = None
    ) -> Any:
        future = Future() if loop is None else loop.create_future()
        key = (id(signature), tuple(sorted(inputs)), tuple(aliases))
        with self._cond:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "The model server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(signature, list(aliases))
            limit = self.options.execution_batch_size
            if math.ceil((queue.rows + size) / limit) > self.options.max_enqueued_batches:
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full"
                )
            queue.tasks.append(_Task(inputs, size, future, time.monotonic(), loop))
            queue.rows += size
            self._cond.notify()
        return future

    def _next_batch(self) -> tuple[_Queue, list[_Task]] | None:
        timeout = self.options.batch_timeout_micros / 1e6
        limit = self.options.execution_batch_size
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                ready, wake = None, None
                for key, queue in self._queues.items():
                    if not queue.tasks:
                        continue
                    due = queue.tasks[0].enqueued + timeout
                    if queue.rows >= limit or due <= now:
                        if ready is None or queue.tasks[0].enqueued < self._queues[ready].tasks[0].enqueued:
                            ready = key
                    else:
                        wake = due if wake is None else min(wake, due)
                if ready is not None:
                    queue = self._queues[ready]
                    batch, rows, taken = [], 0, 0
                    while queue.tasks and rows + queue.tasks[0].size <= limit:
                        task = queue.tasks.popleft()
                        taken += task.size
                        # A request that gave up (its client timed out) while queued is dropped here;
                        # once running, its future can no longer be cancelled.
                        if task.claim():
                            batch.append(task)
                            rows += task.size
                    queue.rows -= taken
                    if not queue.tasks:
                        del self._queues[ready]  # a queue per signature in use, not per signature ever seen
                    if batch:
                        return queue, batch
                    continue
                self._cond.wait(None if wake is None else max(wake - now, 0.0))
        return None

    def _work(self) -> None:
        while True:
            picked = self._next_batch()
            if picked is None:
                return
            queue, batch = picked
            try:
                outputs = self._run_batch(queue, batch)
            except ServingError as exc:
                _deliver(batch, None, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug must fail the requests, never hang them
                log.exception("batch of %s failed", queue.signature.name)
                _deliver(batch, None, ServingError(grpc.StatusCode.INTERNAL, f"batch run failed: {exc}"))
                continue
            _deliver(batch, outputs, None)

    def _run_batch(self, queue: _Queue, batch: list[_Task]) -> list[dict[str, np.ndarray]]:
        signature, aliases = queue.signature, queue.aliases
        rows = sum(task.size for task in batch)
        padded = self._padded_size(rows)
        if len(batch) == 1 and padded == rows:
            merged = batch[0].inputs
        else:
            merged = {alias: self._merge([t.inputs[alias] for t in batch], padded - rows, alias) for alias in batch[0].inputs}
        outputs = signature.run_session(merged, aliases)
        if self._observe is not None:
            self._observe(signature, rows)
        results: list[dict[str, np.ndarray]] = [{} for _ in batch]
        for alias, value in outputs.items():
            if value.ndim == 0:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f"Batched output tensor {alias} has 0 dimensions")
            if value.shape[0] != padded:
                raise ServingError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Batched output tensor's 0th dimension does not equal the sum of the 0th dimension sizes "
                    f"of the input tensors ({alias}: {value.shape[0]} vs. {padded})"
                )
            start = 0
            for i, task in enumerate(batch):
                results[i][alias] = value[start : start + task.size]
                start += task.size
        return results

    def _padded_size(self, rows: int) -> int:
        for allowed in self.options.allowed_batch_sizes:
            if allowed >= rows:
                return allowed
        return rows

    def _merge(self, parts: list[np.ndarray], pad_rows: int, alias: str) -> np.ndarray:
        inner = {p.shape[1:] for p in parts}
        if len(inner) > 1:
            if not self.options.pad_variable_length_inputs:
                raise invalid_argument(
                    f"Tensors with name '{alias}' from different tasks have different shapes and padding is turned off. "
                    "Set pad_variable_length_inputs to true, or ensure that all tensors with the same name have "
                    "equal dimensions starting with the first dim."
                )
            parts = _pad_to_common_shape(parts)
        if pad_rows:
            # TF Serving pads a batch up to an allowed size with copies of its first row.
            parts = [*parts, np.repeat(parts[0][:1], pad_rows, axis=0)]
        return np.concatenate(parts, axis=0)


def _deliver(tasks: list[_Task], results: list[dict] | None, error: Exception | None) -> None:
    """Settle the tasks' futures: concurrent ones here, asyncio ones with one call per event loop."""
    by_loop: dict[Any, list[tuple[Any, Any, Exception | None]]] = {}
    for i, task in enumerate(tasks):
        result = None if results is None else results[i]
        if task.loop is None:
            if error is None:
                task.future.set_result(result)
            else:
                task.future.set_exception(error)
        else:
            by_loop.setdefault(task.loop, []).append((task.future, result, error))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:
            log.debug("an event loop closed before its batch results arrived")


def _settle(items: list[tuple[Any, Any, Exception | None]]) -> None:
    for future, result, error in items:
        if future.done():
            continue  # its request timed out meanwhile
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _joined(parts: list[Future], aliases: list[str]) -> Future:
    """One Future for the pieces of a split task: their outputs concatenated, or the first error."""
    joined: Future = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def on_done(_part: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if not last:
            return
        errors = [p.exception() for p in parts if p.exception() is not None]
        if errors:
            joined.set_exception(errors[0])
        else:
            results = [p.result() for p in parts]
            joined.set_result({a: np.concatenate([r[a] for r in results], axis=0) for a in aliases})

    for part in parts:
        part.add_done_callback(on_done)
    return joined


def _pad_to_common_shape(parts: list[np.ndarray]) -> list[np.ndarray]:
    ndim = {p.ndim for p in parts}
    if len(ndim) != 1:
        raise invalid_argument("Tensors with the same name from different tasks have different ranks: cannot pad")
    target = [max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim)]
    padded = []
    for p in parts:
        widths = [(0, 0)] + [(0, t - s) for t, s in zip(target, p.shape[1:])]
        # Padding repeats the tensor's first element, as TF Serving's batching util does.
        fill = p.flat[0] if p.size else (b"" if p.dtype == object else 0)
        padded.append(np.pad(p, widths, mode="constant", constant_values=fill) if p.dtype != object else _pad_object(p, widths, fill))
    return padded


def _pad_object(array: np.ndarray, widths: list[tuple[int, int]], fill) -> np.ndarray:
    shape = tuple(s + w[1] for s, w in zip(array.shape, widths))
    out = np.full(shape, fill, dtype=object)
    out[tuple(slice(0, s) for s in array.shape)] = array
    return out
