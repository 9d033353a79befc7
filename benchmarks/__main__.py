"""``python -m benchmarks``: run the pipeline and serving benchmarks, print a report, optionally save JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.serving import BATCH_SIZE, CLIENTS, LOAD_SECONDS, WARMUP_SECONDS
from maas_tasks.config import project_root
from maas_tasks.features import DEFAULT_MAX_TOKENS

DATA_ENV = "MAAS_BENCH_DATA"
DEFAULT_DATA = Path("..") / "shared" / "data" / "imdb" / "imdb_train.csv.gz"


def default_data_path() -> Path:
    """``$MAAS_BENCH_DATA``, or the IMDB train file beside the project (relative paths: to the project root)."""
    path = Path(os.environ.get(DATA_ENV) or DEFAULT_DATA).expanduser()
    return path if path.is_absolute() else project_root() / path


def _client_counts(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of client counts >= 1, e.g. 1,8,64")
    return counts


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time every pipeline stage, measure the model's accuracy and calibration, and put the "
        "served model under load (in process, behind Flask, behind the model server over REST and gRPC), "
        "on a labeled review file (no Airflow or PostgreSQL needed).",
    )
    parser.add_argument(
        "--data", type=Path, help=f"CSV/TSV/Parquet file with text, label and movie_id columns (default: ${DATA_ENV} "
        f"or {DEFAULT_DATA} relative to the project root)",
    )
    parser.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    parser.add_argument("--group-col", default="movie_id", help="column kept whole across the split ('' for none)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: the DAG's, %(default)s)")
    parser.add_argument("--batch-size", type=int, default=512, help="texts featurised at a time in training (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="vocabulary size (default %(default)s)")
    parser.add_argument(
        "--clients", type=_client_counts, default=CLIENTS, metavar="N,N,...",
        help=f"concurrent clients of each load cell (default {','.join(map(str, CLIENTS))})",
    )
    parser.add_argument("--request-batch-size", type=int, default=BATCH_SIZE, help="texts per batch request (default %(default)s)")
    parser.add_argument("--load-seconds", type=float, default=LOAD_SECONDS, help="counted seconds of each load cell (default %(default)s)")
    parser.add_argument(
        "--warmup-seconds", type=float, default=WARMUP_SECONDS, help="uncounted seconds before each load cell (default %(default)s)"
    )
    return parser


def run_benchmark(args: argparse.Namespace, data_path: Path) -> dict[str, Any]:
    """Run both benchmarks on ``data_path`` in a throwaway file store; returns the JSON-ready result."""
    from benchmarks.pipeline import MODEL_NAME, run_pipeline, throwaway_registry
    from benchmarks.serving import measure_serving, measure_serving_memory
    from maas_tasks.storage import FileStore

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp, throwaway_registry() as registry:
        store = FileStore(Path(tmp) / "store")
        pipeline = run_pipeline(
            store,
            registry,
            data_path,
            group_col=args.group_col or None,
            max_tokens=args.max_tokens,
            epochs=args.epochs,
            batch_size=args.batch_size,
        )
        export_prefix, eval_texts = pipeline.pop("export_prefix"), pipeline.pop("eval_texts")
        load = measure_serving(
            store,
            export_prefix,
            eval_texts,
            model_name=MODEL_NAME,
            clients=args.clients,
            batch_size=args.request_batch_size,
            seconds=args.load_seconds,
            warmup_seconds=args.warmup_seconds,
        )
        serving = {"load": load, "memory": measure_serving_memory(store, export_prefix, eval_texts, model_name=MODEL_NAME)}
    return {
        "data": str(data_path),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "seconds": time.perf_counter() - started,
        "pipeline": pipeline,
        "serving": serving,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the exit status (2 when the data file is missing)."""
    from benchmarks.report import format_report

    args = build_arg_parser().parse_args(argv)
    data_path = (args.data or default_data_path()).expanduser().resolve()
    if not data_path.is_file():
        print(
            f"benchmark data file {data_path} does not exist. Provide a labeled review file with columns "
            "text, label and movie_id, e.g. the IMDB train split (25,000 reviews) as imdb_train.csv.gz: "
            f"set {DATA_ENV}=/path/to/imdb_train.csv.gz or pass --data FILE.",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = run_benchmark(args, data_path)
    print(format_report(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nresult written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
