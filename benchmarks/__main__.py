"""``python -m benchmarks``: run the pipeline, scaling, featurisation, quality and serving benchmarks, print a
report and keep every figure as JSON in ``bench/results/``."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.serving import BATCH_SIZE, CLIENTS, LOAD_SECONDS, WARMUP_SECONDS
from maas_tasks.config import project_root
from maas_tasks.errors import append_traceback, one_paragraph
from maas_tasks.features import DEFAULT_MAX_TOKENS

DATA_ENV = "MAAS_BENCH_DATA"
DEFAULT_DATA = Path("..") / "shared" / "data" / "imdb" / "imdb_train.csv.gz"
# The sizes: three cuts of the 25k IMDB file and a synthetic 100k built from it.
FULL_SIZES = (5_000, 10_000, 25_000, 100_000)
# --quick: the same sections on less, so a run fits in about three minutes on two cores.
QUICK = {"sizes": (1_000, 2_500), "epochs": 2, "clients": (1, 64), "load_seconds": 0.5, "warmup_seconds": 0.2}
FULL = {"sizes": FULL_SIZES, "epochs": 5, "clients": CLIENTS, "load_seconds": LOAD_SECONDS,
        "warmup_seconds": WARMUP_SECONDS}
SEED = 0
# Progress steps outside the scaling runs: importing the libraries, reading the file, four featurisation
# timings, the quality baseline, the load comparison and the server's memory.
FIXED_STEPS = 2 + 4 + 1 + 2


def default_data_path() -> Path:
    """``$MAAS_BENCH_DATA``, or the IMDB train file beside the project (relative paths: to the project root)."""
    path = Path(os.environ.get(DATA_ENV) or DEFAULT_DATA).expanduser()
    return path if path.is_absolute() else project_root() / path


def _counts(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of counts >= 1, e.g. 1,8,64")
    return counts


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line; options left unset take the full run's value, or the quick run's with ``--quick``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time every pipeline stage from the raw file to a served version at several data sizes, "
        "compare the featurisation and the model with scikit-learn's, and put the served model under load "
        "(in process, behind Flask, behind the model server over REST and gRPC), on a labeled review file "
        "(no Airflow or PostgreSQL server needed). Progress goes to stderr, the report to stdout, every "
        "figure to bench/results/<UTC time>.json.",
    )
    parser.add_argument(
        "--data", type=Path, help=f"CSV/TSV/Parquet file with text, label and movie_id columns (default: ${DATA_ENV} "
        f"or {DEFAULT_DATA} relative to the project root)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run with every section (make bench QUICK=1): "
                        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in QUICK.items()))
    parser.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    parser.add_argument("--results-dir", type=Path, help="where the timestamped result goes (default: bench/results "
                        "under the project root)")
    parser.add_argument("--sizes", type=_counts, metavar="N,N,...", help="rows of each scaling run, smallest first; "
                        "sizes above the file's rows are synthetic (default "
                        f"{','.join(map(str, FULL_SIZES))})")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the subsamples and synthetic rows (default %(default)s)")
    parser.add_argument("--group-col", default="movie_id", help="column kept whole across the split ('' for none)")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default: the DAG's, {FULL['epochs']})")
    parser.add_argument("--batch-size", type=int, default=512, help="texts featurised at a time in training (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="vocabulary size (default %(default)s)")
    parser.add_argument("--clients", type=_counts, metavar="N,N,...",
                        help=f"concurrent clients of each load cell (default {','.join(map(str, CLIENTS))})")
    parser.add_argument("--request-batch-size", type=int, default=BATCH_SIZE, help="texts per batch request (default %(default)s)")
    parser.add_argument("--load-seconds", type=float, help=f"counted seconds of each load cell (default {LOAD_SECONDS})")
    parser.add_argument("--warmup-seconds", type=float, help=f"uncounted seconds before each load cell (default {WARMUP_SECONDS})")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line with every unset option filled from :data:`FULL` or :data:`QUICK`, and
    ``data`` resolved (``--data``, else ``$MAAS_BENCH_DATA``, else the default file)."""
    args = build_arg_parser().parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.sizes = tuple(sorted(set(args.sizes)))
    args.data = (args.data or default_data_path()).expanduser().resolve()
    return args


def main_size(sizes: tuple[int, ...], rows: int) -> int:
    """The size whose run gives the quality, featurisation and serving figures: the largest one the file
    holds (real rows), else the smallest (synthetic)."""
    real = [n for n in sizes if n <= rows]
    return max(real) if real else min(sizes)


def _scaling_run(n: int, prepared: dict[str, Any], pipeline: dict[str, Any]) -> dict[str, Any]:
    return {
        "size": n, "rows": n, "synthetic": prepared["synthetic"], "split_rows": pipeline["rows"],
        "stages": pipeline["stages"], "vocab_size": pipeline["vocab_size"], "accuracy": pipeline["metrics"]["accuracy"],
        "train": pipeline["train"],
    }


def run_benchmark(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    """Run every benchmark on ``args.data``, each scaling size in its own throwaway store and registry (a
    database each on one throwaway PostgreSQL cluster); returns the JSON-ready result (without the run context: see :func:`benchmarks.results.run_context`)."""
    import pandas as pd

    from benchmarks.baselines import compare_featurisation, compare_quality
    from benchmarks.datasets import prepare_size, read_reviews
    from benchmarks.pipeline import MODEL_NAME, import_libraries, run_pipeline, throwaway_cluster, throwaway_registry
    from benchmarks.scaling import scaling_summary, size_label
    from benchmarks.serving import measure_serving, measure_serving_memory
    from maas_tasks.storage import FileStore

    started = time.perf_counter()
    progress.step("importing TensorFlow, Keras and Great Expectations")
    import_seconds = import_libraries()
    progress.step(f"reading {args.data.name}")
    df = read_reviews(args.data)
    main_n = main_size(args.sizes, len(df))
    group_col = args.group_col or None
    runs, notes = [], []
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp, throwaway_cluster() as cluster:
        root = Path(tmp)
        main_store = main_pipeline = None
        for n in args.sizes:
            label = size_label(n)
            kind = "the file itself" if n == len(df) else "synthetic" if n > len(df) else "subsample"
            progress.step(f"scaling {label}: preparing the data ({kind})")
            if n > len(df):
                notes.append(f"{label}: the file has {len(df):,} rows, so the {n:,} rows are synthetic (resampled sentences)")
            workdir = root / label
            prepared = prepare_size(df, args.data, n, workdir, seed=args.seed, group_col=group_col)
            store = FileStore(workdir / "store")
            with throwaway_registry(cluster, f"maas_{n}") as registry:
                pipeline = run_pipeline(
                    store, registry, prepared["path"], group_col=group_col, max_tokens=args.max_tokens,
                    epochs=args.epochs, batch_size=args.batch_size,
                    on_stage=lambda stage, label=label: progress.step(f"scaling {label}: {stage}"),
                )
            runs.append(_scaling_run(n, prepared, pipeline))
            if n == main_n:
                main_store, main_pipeline = store, pipeline
            else:
                shutil.rmtree(workdir, ignore_errors=True)

        features_key = main_pipeline.pop("features_key")
        train_df, eval_df = (
            pd.read_parquet(io.BytesIO(main_store.get_bytes(f"{features_key}/{name}.parquet"))) for name in ("train", "eval")
        )
        classes = main_pipeline["classes"]
        featurisation, vectorizer, matrix = compare_featurisation(
            train_df["text"].tolist(), train_df["label"].tolist(), classes, max_tokens=args.max_tokens,
            batch_size=args.batch_size, on_step=progress.step,
        )
        progress.step(f"quality: scikit-learn TF-IDF + LogisticRegression on the {size_label(main_n)} split")
        quality = compare_quality(vectorizer, matrix, train_df, eval_df, classes, main_pipeline["metrics"])
        del vectorizer, matrix

        export_prefix, eval_texts = main_pipeline.pop("export_prefix"), main_pipeline.pop("eval_texts")
        progress.step(f"serving: load comparison ({len(args.clients)} client counts x 2 request sizes x 5 servers)")
        load = measure_serving(
            main_store, export_prefix, eval_texts, model_name=MODEL_NAME, clients=args.clients,
            batch_size=args.request_batch_size, seconds=args.load_seconds, warmup_seconds=args.warmup_seconds,
        )
        progress.step("serving: the model server's memory on large batches")
        memory = measure_serving_memory(main_store, export_prefix, eval_texts, model_name=MODEL_NAME)
    return {
        "quick": args.quick,
        "data": str(args.data),
        "data_rows": len(df),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                     if k not in ("data", "out", "results_dir")},
        "seconds": time.perf_counter() - started,
        "scaling": {
            "main_size": main_n,
            "import_seconds": import_seconds,
            "max_tokens": args.max_tokens,
            "served": "serve = download the exported version from the store into a fresh serving directory, "
                      "start the model server on it (python -m serving.server, the stack's batching) and wait "
                      "for its first REST predict answer",
            "synthetic": "sizes above the file's rows: each row copies a real row's movie, label and sentence "
                         "count, its text is that many sentences drawn (with replacement, seeded) from the real "
                         "reviews of the same movie and label",
            "notes": notes,
            "runs": runs,
            "summary": scaling_summary(runs),
        },
        "pipeline": main_pipeline,
        "featurisation": featurisation,
        "quality": quality,
        "serving": {"load": load, "memory": memory},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the exit status: 2 when the data file is missing, 1 when a step fails (one
    paragraph on stderr, the traceback in ``<results dir>/<UTC time>.log``; ``MAAS_TRACEBACK`` re-raises),
    130 when interrupted."""
    from benchmarks.progress import Progress
    from benchmarks.report import format_report
    from benchmarks.results import RESULTS_DIR, results_path, run_context, write_result

    args = parse_args(argv)
    if not args.data.is_file():
        print(
            f"benchmark data file {args.data} does not exist. Provide a labeled review file with columns "
            "text, label and movie_id, e.g. the IMDB train split (25,000 reviews) as imdb_train.csv.gz: "
            f"set {DATA_ENV}=/path/to/imdb_train.csv.gz or pass --data FILE.",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.pipeline import STAGES

    begun = datetime.now(timezone.utc)
    path = results_path(args.results_dir or project_root() / RESULTS_DIR, begun)
    progress = Progress(FIXED_STEPS + len(args.sizes) * (1 + len(STAGES)))
    try:
        result = {"started_at": begun.isoformat(timespec="seconds"), **run_context(project_root()),
                  **run_benchmark(args, progress)}
    except KeyboardInterrupt:
        print("benchmark interrupted: nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a user sees one paragraph and where the details are
        log = append_traceback(path.with_suffix(".log"), f"python -m benchmarks {' '.join(sys.argv[1:])}")
        print(f"benchmark failed: {one_paragraph(str(exc) or type(exc).__name__, 1000)}", file=sys.stderr)
        if log is not None:
            print(f"the full error is in {log}", file=sys.stderr)
        if os.environ.get("MAAS_TRACEBACK"):
            raise
        return 1
    result["results_file"] = str(path)
    write_result(result, path)
    if args.out:
        write_result(result, args.out)
    print(format_report(result))
    print(f"\nresult written to {path}" + (f" and {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
