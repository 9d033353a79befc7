"""The ``maas`` command: run the local stack, train through Airflow, query the served model and the registry.

``maas stack up|down|status`` manages the local stack, ``maas run`` runs the training DAG through
Airflow (``dag.test()``, so it needs no scheduler), ``maas predict`` calls the model server over REST
or gRPC, and ``maas models`` lists the registry's versions. Exit status: 0 on success, 1 when the
command ran but the outcome is a failure (a failed run, a server error), 2 on bad usage or settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from maas_tasks.config import ConfigError, Settings, load_settings, project_root

DAG_ID = "maas_training"
FAILURE_EVENTS = ("validation_failed", "promotion_failed")


class CliError(RuntimeError):
    """A command cannot proceed; printed as ``maas: error: <message>`` with exit status 2."""


def _print_json_or_table(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def cmd_stack(args: argparse.Namespace, settings: Settings) -> int:
    from maas_tasks import stack

    if args.action == "up":
        stack.stack_up(settings, with_airflow=args.airflow)
    elif args.action == "down":
        stack.stack_down(settings)
    else:
        status = stack.stack_status(settings)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            for name, info in status.items():
                state = f"running (pid {info['pid']})" if info["running"] else "stopped"
                extra = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("running", "pid"))
                print(f"{name:<13} {state:<22} {extra}")
    return 0


def parse_params(pairs: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into DAG params typed like their defaults.

    Raises:
        CliError: a pair is malformed, names an unknown param, or has a value of the wrong type.
    """
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--param {pair!r} is not KEY=VALUE (e.g. --param epochs=3)")
        if key not in defaults:
            raise CliError(f"--param {key!r} is not a parameter of {DAG_ID}; known: {', '.join(sorted(defaults))}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise CliError(f"--param {key}={raw!r}: expected a {type(default).__name__}") from None
        params[key] = value
    return params


def _load_dag():
    from airflow.dag_processing.dagbag import DagBag

    dag_file = project_root() / "dags" / f"{DAG_ID}.py"
    bag = DagBag(dag_folder=str(dag_file))
    if bag.import_errors:
        raise CliError(f"{dag_file} failed to import: {bag.import_errors}")
    return bag.dags[DAG_ID]


def _require_stack(settings: Settings, *, serving: bool = False) -> None:
    """Fail fast, before minutes of training, when the local stack a command needs is down."""
    from maas_tasks.postgres import local_cluster, read_status
    from maas_tasks.stack import SERVER_NAME, process_status

    if settings.registry_dsn is None and not read_status(local_cluster(settings)).running:
        raise CliError("the local stack is not running: start it with `maas stack up`")
    if serving and settings.registry_dsn is None and not process_status(settings, SERVER_NAME).running:
        raise CliError("the model server of the local stack is not running: start it with `maas stack up`")


def run_pipeline(settings: Settings, dag, conf: dict[str, Any]) -> dict[str, Any]:
    """Run the training DAG once through ``dag.test()`` and summarise it from the registry."""
    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry

    dag_run = dag.test(run_conf=conf)
    order = list(dag.task_ids)
    with Registry.connect(registry_dsn(settings)) as registry:
        versions = [asdict(v) for v in registry.list_versions() if v.dag_run_id == dag_run.run_id]
        failures = [
            asdict(e)
            for kind in FAILURE_EVENTS
            for e in registry.list_events(kind=kind)
            if (e.detail or {}).get("dag_run_id") == dag_run.run_id
        ]
    instances = sorted(dag_run.get_task_instances(), key=lambda ti: order.index(ti.task_id))
    return {
        "run_id": dag_run.run_id,
        "state": str(dag_run.state),
        "tasks": {ti.task_id: str(ti.state) for ti in instances},
        "version": versions[0] if versions else None,
        "failures": failures,
    }


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from maas_tasks import stack
    from maas_tasks.sample_data import sample_data_path

    _require_stack(settings, serving=True)
    data = Path(args.data).expanduser().resolve() if args.data else sample_data_path()
    if not data.is_file():
        raise CliError(f"--data {args.data}: no such file")
    # Airflow reads its configuration when first imported: set it up before loading the DAG.
    os.environ.update(stack.airflow_environment(settings))
    if args.quiet:
        os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    dag = _load_dag()
    conf = parse_params(args.param, dag.params.dump())
    conf["data_path"] = str(data)
    for key, value in (("model_name", args.model), ("text_col", args.text_col), ("label_col", args.label_col)):
        if value:
            conf[key] = value
    conf.setdefault("model_name", settings.model_name)
    print(f"running {DAG_ID} on {data} ...", flush=True)
    summary = run_pipeline(settings, dag, conf)

    print()
    print(f"run        {summary['run_id']}: {summary['state']}")
    print("tasks      " + ", ".join(f"{t}={s.split('.')[-1]}" for t, s in summary["tasks"].items()))
    version = summary["version"]
    if version:
        metrics = version.get("metrics") or {}
        shown = ", ".join(
            f"{k} {metrics[k]:.4f}" if isinstance(metrics.get(k), (int, float)) else f"{k} n/a"
            for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "ece")
            if k in metrics
        )
        print(f"version    {version['model_name']} v{version['version']} ({version['status']})")
        print(f"metrics    {shown}")
        gate = metrics.get("gate") or {}
        print(f"gate       {'passed' if version['status'] != 'rejected' else 'rejected'}: {gate.get('reason', '')}")
        print(f"promoted   {'yes' if version['status'] == 'serving' else 'no'}")
    for event in summary["failures"]:
        print(f"error      {event['kind']}: {(event['detail'] or {}).get('message', '')}")
    return 0 if "success" in summary["state"] else 1


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from serving import client

    model = args.model or settings.model_name
    if args.grpc:
        results = client.predict_grpc(args.text, model=model, target=settings.grpc_target, version=args.version)
    else:
        results = client.predict_rest(args.text, model=model, rest_url=settings.rest_url, version=args.version)
    api = "gRPC" if args.grpc else "REST"
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return 0
    for r in results:
        print(f"[{api}] {model} v{r['version']}: {r['label']} (score {r['score']:.4f})  text: {r['text']!r}")
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry

    _require_stack(settings)
    with Registry.connect(registry_dsn(settings)) as registry:
        versions = registry.list_versions(args.model)
    # Newest first: the versions a user asks about are the recent ones.
    rows = [asdict(v) for v in sorted(versions, key=lambda v: (v.model_name, -v.version))]
    for row in rows:
        metrics = row.get("metrics") or {}
        for key in ("accuracy", "f1", "roc_auc"):
            row[key] = f"{metrics[key]:.4f}" if isinstance(metrics.get(key), (int, float)) else None
    columns = ["model_name", "version", "status", "accuracy", "f1", "roc_auc", "created_at", "dag_run_id"]
    _print_json_or_table(rows, columns, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maas", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start, stop or inspect the local stack")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--airflow", action="store_true", help="with up: also start `airflow standalone` (web UI)")
    p.add_argument("--json", action="store_true", help="with status: print JSON")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("run", help="run the training DAG once through Airflow (dag.test)")
    p.add_argument("--data", help="labeled CSV/TSV(.gz) or Parquet file (default: the bundled sample)")
    p.add_argument("--model", help="model name (default: MAAS_MODEL_NAME or sentiment)")
    p.add_argument("--text-col", help="text column (default: text)")
    p.add_argument("--label-col", help="label column (default: label)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any DAG param, repeatable")
    p.add_argument("--quiet", action="store_true", help="show only warnings and errors from Airflow's task logs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("predict", help="classify texts with the served model")
    p.add_argument("text", nargs="+", help="one or more texts")
    p.add_argument("--grpc", action="store_true", help="use the gRPC API instead of REST")
    p.add_argument("--model", help="model name (default: MAAS_MODEL_NAME or sentiment)")
    p.add_argument("--version", type=int, help="a specific loaded version (default: the served one)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="list model versions in the registry")
    p.add_argument("--model", help="only this model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # TensorFlow's C++ start-up chatter buries the answers of `predict`; warnings and errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        settings = load_settings()
        return args.func(args, settings)
    except (CliError, ConfigError) as exc:
        print(f"maas: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI reports every failure as one readable line
        from maas_tasks.storage import StoreError

        from maas_tasks.postgres import PostgresError
        from maas_tasks.registry import RegistryError
        from serving.client import ServingClientError

        if isinstance(exc, (StoreError, ServingClientError, PostgresError, RegistryError)):
            print(f"maas: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
