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
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from maas_tasks.config import ConfigError, Settings, load_settings, project_root
from maas_tasks.errors import append_traceback, one_paragraph

DAG_ID = "maas_training"


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

    if args.action != "up":
        # Status and down address this MAAS_HOME's running stack, whatever the shell's variables say.
        for note in stack.settings_disagreements(settings):
            print(f"maas: warning: {note}; using the running stack's value", file=sys.stderr)
        settings = stack.recorded_settings(settings)
    if args.action == "up":
        if args.executor and not args.airflow:
            raise CliError(
                "--executor chooses Airflow's executor: use it with --airflow (maas stack up --airflow --executor celery)"
            )
        stack.stack_up(settings, with_airflow=args.airflow, executor=args.executor, with_gateway=args.gateway)
    elif args.action == "down":
        stack.stack_down(settings)
    else:
        status = stack.stack_status(settings)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            width = max(map(len, status))
            for name, info in status.items():
                state = f"running (pid {info['pid']})" if info["running"] else "stopped"
                extra = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("running", "pid"))
                print(f"{name:<{width}} {state:<22} {extra}")
    return 0


def parse_params(pairs: Sequence[str], params: Any) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` strings into DAG params, typed and checked by the DAG's own param schemas.

    Args:
        params: the DAG's ``ParamsDict`` (names, defaults and JSON schemas).

    Raises:
        CliError: a pair is malformed, names an unknown param, or has a value its schema refuses.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--param {pair!r} is not KEY=VALUE (e.g. --param epochs=3)")
        if key not in params:
            raise CliError(f"--param {key!r} is not a parameter of {DAG_ID}; known: {', '.join(sorted(params))}")
        values[key] = check_param(params, key, raw, f"--param {key}")
    return values


def check_param(params: Any, key: str, raw: str, flag: str) -> Any:
    """``raw`` converted to the type of param ``key``'s schema and checked against it.

    Raises:
        CliError: the value does not convert or the schema refuses it; the message states the param's limits.
    """
    import jsonschema

    param = params.get_param(key)
    schema = param.schema
    types = schema.get("type") or type(param.value).__name__
    types = [types] if isinstance(types, str) else list(types)
    try:
        value = _convert_param(raw, types)
    except ValueError:
        raise CliError(f"{flag}={raw!r}: expected {' or '.join(t for t in types if t != 'null')}") from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        limits = f" ({param.description})" if param.description else ""
        raise CliError(f"{flag}={raw!r}: {_explain(exc, value)}{limits}") from None
    return value


def _convert_param(raw: str, types: list[str]) -> Any:
    if "null" in types and raw.strip().lower() in ("", "none", "null"):
        return None
    if "boolean" in types or "bool" in types:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(raw)
        return raw.lower() in ("true", "1")
    if "integer" in types or "int" in types:
        return int(raw)
    if "number" in types or "float" in types:
        return float(raw)
    return raw


def _explain(error: Any, value: Any) -> str:
    """A jsonschema error in one sentence, without the schema dump jsonschema appends."""
    if error.validator == "pattern":
        return f"{value!r} is not allowed"
    if error.validator == "enum":
        allowed = [v for v in error.validator_value if v is not None]
        if len(allowed) > 10 and allowed == list(range(allowed[0], allowed[0] + len(allowed))):
            return f"{value!r} is not a whole number from {allowed[0]} to {allowed[-1]}"
        return f"{value!r} is not one of {', '.join(map(str, allowed))}"
    return str(error.message)


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
    from maas_tasks.stack import SERVER_NAME, check_stack_settings, process_status

    check_stack_settings(settings)
    if settings.registry_dsn is None and not read_status(local_cluster(settings)).running:
        raise CliError("the local stack is not running: start it with `maas stack up`")
    if serving and settings.registry_dsn is None and not process_status(settings, SERVER_NAME).running:
        raise CliError("the model server of the local stack is not running: start it with `maas stack up`")


def run_pipeline(
    settings: Settings,
    dag,
    conf: dict[str, Any],
    on_task_finished: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Run the training DAG once and summarise it from the registry.

    When a live scheduler serves the DAG (e.g. ``maas stack up --airflow`` with the DAG unpaused), the run
    is handed to it, as the UI's Trigger button does, and followed: two orchestrators on one run would
    both execute its tasks. Otherwise it runs in this process through ``dag.test()``. Call it inside
    ``maas_runs.route_run_logs``, which puts each task's log where the Airflow UI reads it and reports
    the attempts run in this process; ``on_task_finished`` hears those the scheduler runs.
    """
    from maas_runs import fail_orphaned_runs, run_in_process, run_on_scheduler, scheduler_serves  # plugins/

    from maas_tasks.postgres import registry_dsn
    from maas_tasks.registry import Registry

    claims = settings.home / "run" / "maas-run"
    for run_id in fail_orphaned_runs(claims):
        print(f"marked run {run_id} failed: the maas run that ran it was killed", flush=True)
    if scheduler_serves(dag.dag_id):
        print(f"the Airflow scheduler serves {dag.dag_id}: it runs this run (you can follow it in the web UI too)")
        result = run_on_scheduler(
            dag.dag_id, conf, on_task_finished=on_task_finished, on_waiting=lambda note: print(note, flush=True)
        )
    else:
        result = run_in_process(dag, conf, claims)
    order = list(dag.task_ids)
    with Registry.connect(registry_dsn(settings)) as registry:
        versions = [asdict(v) for v in registry.list_versions() if v.dag_run_id == result.run_id]
        snapshot = run_snapshot(registry, result.run_id, versions[0] if versions else None)
    return {
        "run_id": result.run_id,
        "state": result.state,
        "tasks": dict(sorted(result.task_states.items(), key=lambda item: order.index(item[0]))),
        "version": versions[0] if versions else None,
        "snapshot": snapshot,
        "via_scheduler": result.via_scheduler,
    }


def run_snapshot(registry: Any, run_id: str, version: dict[str, Any] | None) -> dict[str, Any] | None:
    """The snapshot a run trained on (its version's), or else the one it recorded, as a dict; None if neither."""
    snapshot = None
    if version and version.get("snapshot_id"):
        snapshot = registry.get_snapshot(version["snapshot_id"])
    else:
        snapshot = next((s for s in reversed(registry.list_snapshots()) if s.metadata.get("dag_run_id") == run_id), None)
    return None if snapshot is None else asdict(snapshot)


def format_data_lines(snapshot: dict[str, Any], run_id: str) -> list[str]:
    """What ``maas run`` says about the data: the snapshot (new or seen before), quarantine, Data Docs, drift."""
    created_by = snapshot["metadata"].get("dag_run_id")
    origin = "new" if created_by == run_id else "already ingested" + (f" by run {created_by}" if created_by else "")
    lines = [f"data       snapshot {snapshot['id']} of {snapshot['source']}: {snapshot['rows']} rows ({origin})"]
    if snapshot.get("quarantined_rows"):
        lines.append(f"           {snapshot['quarantined_rows']} rows quarantined: {snapshot['quarantine_uri']}")
    if snapshot.get("docs_uri"):
        lines.append(f"           Data Docs: {snapshot['docs_uri']}")
    drift = snapshot.get("drift") or {}
    if drift:
        verdict = "FLAGGED: " + "; ".join(drift.get("reasons") or []) if drift.get("flagged") else (
            "none above the thresholds" if drift.get("compared") else drift.get("message", "not compared"))
        report = drift.get("html_uri") or snapshot.get("drift_uri")
        lines.append(f"drift      {one_paragraph(verdict, 300)}" + (f" ({report})" if report else ""))
    return lines


def _print_task_outcome(outcome: Any) -> None:
    error = f"  {one_paragraph(outcome.error, 120)}" if outcome.error and outcome.state != "success" else ""
    print(f"  {outcome.task_id:<16} {outcome.state:<13} {outcome.seconds:6.1f} s{error}", flush=True)


# `maas run` options that set a DAG param of the same meaning (option, param).
RUN_OPTIONS = (
    ("model", "model_name"), ("text_col", "text_col"), ("label_col", "label_col"), ("id_col", "id_col"),
    ("group_col", "group_col"), ("label_map", "label_map"), ("slice_cols", "slice_cols"),
    ("query", "table_query"), ("watermark_col", "watermark_col"),
)


def check_run_options(args: argparse.Namespace) -> str:
    """Check ``maas run``'s data source, model name and label map before Airflow starts (seconds of start-up
    for an answer that needs none); returns the source as the DAG takes it.

    Raises:
        CliError / ConfigError: a usage error, said in one sentence (exit status 2).
    """
    from maas_tasks.config import check_model_name, parse_label_map
    from maas_tasks.sample_data import sample_data_path
    from maas_tasks.sources import IngestError, check_source

    if args.model:
        check_model_name(args.model, "--model")
    parse_label_map(args.label_map, "--label-map")
    if not args.data:
        return str(sample_data_path())
    try:
        return check_source(args.data, table_query=args.query, watermark_col=args.watermark_col)
    except IngestError as exc:
        raise CliError(f"--data: {exc}") from None


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from maas_tasks import stack

    data = check_run_options(args)
    _require_stack(settings, serving=True)
    # Airflow reads its configuration when first imported: set it up before loading the DAG.
    os.environ.update(stack.airflow_environment(settings))
    import airflow  # noqa: F401 - configures Airflow's logging and puts plugins/ on sys.path

    from maas_runs import route_run_logs

    run_log = settings.home / "logs" / f"maas-run-{time.strftime('%Y%m%dT%H%M%S')}.log"
    stack.make_private_dirs(settings)
    os.close(os.open(run_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # Airflow's log is the owner's alone
    outcomes: list[Any] = []

    def on_task_finished(outcome: Any) -> None:
        outcomes.append(outcome)
        if not args.quiet:
            _print_task_outcome(outcome)

    with route_run_logs(run_log, to_console=args.verbose, on_task_finished=on_task_finished):
        dag = _load_dag()
        conf = parse_params(args.param, dag.params)
        conf["data_path"] = data
        for option, key in RUN_OPTIONS:
            value = getattr(args, option)
            if value:
                conf[key] = check_param(dag.params, key, value, "--" + option.replace("_", "-"))
        conf.setdefault("model_name", settings.model_name)
        print(f"running {DAG_ID} on {data} (Airflow's log: {run_log})", flush=True)
        summary = run_pipeline(settings, dag, conf, on_task_finished=on_task_finished)

    print()
    print(f"run        {summary['run_id']}: {summary['state']}")
    print("tasks      " + ", ".join(f"{t}={s}" for t, s in summary["tasks"].items()))
    if summary["snapshot"]:
        print("\n".join(format_data_lines(summary["snapshot"], summary["run_id"])))
    version = summary["version"]
    if version:
        from maas_tasks.evaluate import format_metrics

        metrics = version.get("metrics") or {}
        print(f"version    {version['model_name']} v{version['version']} ({version['status']})")
        print(f"metrics    {format_metrics(metrics)}")
        gate = metrics.get("gate") or {}
        verdict = "rejected" if version["status"] == "rejected" else "forced" if gate.get("forced") else "passed"
        print(f"gate       {verdict}" + (f" (forced by {gate['forced_by']})" if gate.get("forced") else ""))
        for check in gate.get("checks") or []:
            print(f"  {'pass' if check['passed'] else 'FAIL'}     {check['detail']}")
        if not gate.get("checks"):
            print(f"           {gate.get('reason', '')}")
        if version["status"] == "rejected":
            print("           the model is not exported and the serving version keeps serving; to promote it anyway,")
            print("           run again with --param force_promote=true")
        promoted = {"serving": "yes", "superseded": "no: superseded (a newer version became stable after this one "
                    "was gated, so it stays)"}
        print(f"promoted   {promoted.get(version['status'], 'no')}")
        if version.get("report_uri"):
            print(f"report     {version['report_uri']}")
    # Each failed task once, with its last attempt's message: that is the one that decided the run.
    failed = {o.task_id: o for o in outcomes if o.state in ("failed", "up_for_retry")}
    for task_id, outcome in failed.items():
        if summary["tasks"].get(task_id) != "failed":
            continue  # a retry succeeded
        print(f"error      {task_id} failed: {one_paragraph(outcome.error or 'see its log', 600)}")
        print(f"           task log: {outcome.log_path}")
    return 0 if summary["state"] == "success" else 1


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from serving import client

    model = args.model or settings.model_name
    call = {"model": model, "version": args.version, "timeout": args.timeout, "retries": args.retries}
    grpc_target, rest_url = settings.grpc_target, settings.rest_url
    if args.gateway:
        from maas_tasks.config import api_key_setting
        from serving.gateway import first_api_key

        grpc_target, rest_url = settings.gateway_grpc_target, settings.gateway_rest_url
        # Without MAAS_API_KEY, the local gateway's key file (the user's own, 0600) provides one.
        call["api_key"] = api_key_setting() or first_api_key(settings.gateway_keys_file)
    if args.grpc:
        results = client.predict_grpc(args.text, target=grpc_target, **call)
    else:
        results = client.predict_rest(args.text, rest_url=rest_url, **call)
    api = ("gRPC" if args.grpc else "REST") + (" via gateway" if args.gateway else "")
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
        targets = [t for t in registry.serving_targets() if args.model in (None, t.model_name)]
        nodes = registry.serving_nodes()
    # Newest first: the versions a user asks about are the recent ones.
    rows = [asdict(v) for v in sorted(versions, key=lambda v: (v.model_name, -v.version))]
    for row in rows:
        metrics = row.get("metrics") or {}
        for key in ("accuracy", "f1", "roc_auc"):
            row[key] = f"{metrics[key]:.4f}" if isinstance(metrics.get(key), (int, float)) else None
    serving = serving_state(targets, nodes)
    for row in rows:
        target = next((t for t in targets if t.model_name == row["model_name"]), None)
        row["desired"] = next(
            (role for role in ("stable", "canary", "previous") if target and getattr(target, role) == row["version"]), None
        )
        row["observed"] = observed_states(nodes, row["model_name"], row["version"])
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    columns = ["model_name", "version", "status", "desired", "accuracy", "f1", "roc_auc", "created_at", "dag_run_id"]
    _print_json_or_table(rows, columns, False)
    for model in serving:
        desired = model["desired"]
        print()
        print(
            f"{model['model_name']}: desired stable v{desired['stable']}"
            + (f", canary v{desired['canary']}" if desired["canary"] else "")
            + (f", previous v{desired['previous']}" if desired["previous"] else "")
            + f" (generation {desired['generation']})"
        )
        for node in model["nodes"]:
            mark = "agrees" if node["agrees"] else f"DISAGREES: {node['problem']}"
            print(f"  node {node['node_id']:<12} serves {node['serving'] or 'nothing'}; last report {node['last_seen']}; {mark}")
        if not model["nodes"]:
            print("  no serving node has reported yet (start one: maas stack up)")
    return 0


def observed_states(nodes: list[Any], model_name: str, version: int) -> dict[str, str]:
    """Per node, the state it last reported for a version in any role (``AVAILABLE as stable``, ...)."""
    states = {}
    for node in nodes:
        entry = (node.report.get("models") or {}).get(model_name, {})
        for role in ("stable", "canary", "previous"):
            seen = entry.get(role) or {}
            if seen.get("version") == version:
                states[node.node_id] = f"{seen.get('state')} as {role}"
                break
    return states


def serving_state(targets: list[Any], nodes: list[Any]) -> list[dict[str, Any]]:
    """Per model: the desired state, and per node what it observed and whether that agrees."""
    out = []
    for target in targets:
        desired = {"stable": target.stable, "canary": target.canary, "previous": target.previous,
                   "generation": target.generation}
        rows = []
        for node in nodes:
            entry = (node.report.get("models") or {}).get(target.model_name, {})
            stable = entry.get("stable") or {}
            serving = f"v{stable['version']} ({stable.get('state')})" if stable else None
            problem = None
            if node.report.get("error") or entry.get("error"):
                problem = node.report.get("error") or entry.get("error")
            elif entry.get("generation", 0) < target.generation:
                problem = f"has applied generation {entry.get('generation', 0)}, not {target.generation} yet"
            elif stable.get("version") != target.stable or stable.get("state") != "AVAILABLE":
                problem = f"serves {serving or 'nothing'}, not v{target.stable}"
            rows.append({"node_id": node.node_id, "serving": serving, "last_seen": f"{node.last_seen:%Y-%m-%d %H:%M:%S}",
                         "generation": entry.get("generation"), "agrees": problem is None, "problem": problem})
        out.append({"model_name": target.model_name, "desired": desired, "nodes": rows})
    return out


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from maas_tasks.postgres import registry_dsn
    from maas_tasks.promote import rollback_version
    from maas_tasks.registry import Registry
    from maas_tasks.storage import open_store

    _require_stack(settings)
    model = args.model or settings.model_name
    with Registry.connect(registry_dsn(settings)) as registry:
        before = registry.serving_target(model)
        print(f"rolling {model} back from v{before.stable if before else None} ...", flush=True)
        result = rollback_version(settings, open_store(settings=settings), registry, model, args.to)
    if result["outcome"] == "superseded":
        print(f"not rolled back: v{result['stable']} became stable meanwhile; run maas rollback again to replace it")
        return 1
    note = " (it already was)" if result["outcome"] == "already stable" else ""
    print(f"{model} v{result['stable']} is stable{note} on node(s) {', '.join(result['nodes'])}; "
          f"v{result['previous_version']} is retired")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maas", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start, stop or inspect the local stack")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--airflow", action="store_true", help="with up: also start Airflow (scheduler, web UI, ...)")
    p.add_argument(
        "--executor", choices=["local", "celery"],
        help="with up --airflow: Airflow's executor (default MAAS_AIRFLOW_EXECUTOR or local); celery also starts "
        "Redis and a Celery worker",
    )
    p.add_argument(
        "--gateway", action="store_true",
        help="with up: also start a second model server replica and the API gateway (nginx) in front of both",
    )
    p.add_argument("--json", action="store_true", help="with status: print JSON")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("run", help="run the training DAG once through Airflow (dag.test)")
    p.add_argument(
        "--data", metavar="SOURCE",
        help="labeled CSV/TSV/JSON Lines (.gz) or Parquet file, a directory or glob of them, an aclImdb directory or "
        "its .tar.gz, an s3://bucket/prefix, or postgresql://user@host/db?table=T (default: the bundled sample)",
    )
    p.add_argument("--model", help="model name (default: MAAS_MODEL_NAME or sentiment)")
    p.add_argument("--text-col", metavar="COL", help="text column (default: text)")
    p.add_argument("--label-col", metavar="COL", help="label column (default: label)")
    p.add_argument("--id-col", metavar="COL", help="column of unique row ids (keeps each row's split as data grows)")
    p.add_argument("--group-col", metavar="COL", help="rows sharing its value stay in one split (e.g. movie_id)")
    p.add_argument("--label-map", metavar="RAW=NAME,...", help="labels in the data -> served class names, e.g. 0=negative,1=positive")
    p.add_argument("--slice-cols", metavar="COL,...", help="columns the evaluation reports metrics by")
    p.add_argument("--query", metavar="SQL", help="for a PostgreSQL source: the SELECT giving the rows")
    p.add_argument("--watermark-col", metavar="COL", help="for a PostgreSQL source: read only rows past the last value ingested")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any DAG param, repeatable")
    p.add_argument("--quiet", action="store_true", help="print only the summary, not a line per task")
    p.add_argument("--verbose", action="store_true", help="also stream Airflow's full log to the terminal")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("predict", help="classify texts with the served model")
    p.add_argument("text", nargs="+", help="one or more texts")
    p.add_argument("--grpc", action="store_true", help="use the gRPC API instead of REST")
    p.add_argument(
        "--gateway", action="store_true",
        help="call the API gateway (MAAS_GATEWAY_*_PORT) with MAAS_API_KEY, else the local key file's first key",
    )
    p.add_argument("--model", help="model name (default: MAAS_MODEL_NAME or sentiment)")
    p.add_argument("--version", type=int, help="a specific loaded version (default: the served one)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")
    p.add_argument(
        "--retries", type=int, default=3, help="tries again on UNAVAILABLE/RESOURCE_EXHAUSTED or no answer (default 3)"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="list model versions, the desired serving state and what each node serves")
    p.add_argument("--model", help="only this model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("rollback", help="make an earlier version stable again, on every node, with no failed request")
    p.add_argument("--to", type=int, metavar="VERSION", help="the version to serve (default: the previous stable one)")
    p.add_argument("--model", help="model name (default: MAAS_MODEL_NAME or sentiment)")
    p.set_defaults(func=cmd_rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # TensorFlow's C++ start-up chatter buries the answers of `predict`; warnings and errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    settings = None
    try:
        settings = load_settings()
        return args.func(args, settings)
    except (CliError, ConfigError) as exc:
        print(f"maas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maas: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a user sees one paragraph and where the details are
        message = describe_lost_database(exc, settings) or str(exc) or type(exc).__name__
        print(f"maas: error: {one_paragraph(message, 1000)}", file=sys.stderr)
        log = _write_traceback(settings)
        if log is not None:
            print(f"maas: the full error is in {log}", file=sys.stderr)
        if os.environ.get("MAAS_TRACEBACK"):
            raise
        return 1


# What psycopg2 says when the server is gone or goes away mid-connection.
_LOST_SERVER_SIGNS = ("connection refused", "could not connect", "server closed the connection",
                      "terminating connection", "connection to server", "no connection to the server")


def describe_lost_database(exc: BaseException, settings: Settings | None) -> str | None:
    """One paragraph for a command that lost PostgreSQL (stopped, restarted, out of reach), which Airflow and
    the registry report as a long SQLAlchemy error; None when ``exc`` is something else."""
    seen = exc
    while seen is not None:
        name = type(seen).__name__
        text = str(seen).splitlines()[0] if str(seen) else ""
        if name in ("OperationalError", "InterfaceError") and any(s in str(seen).lower() for s in _LOST_SERVER_SIGNS):
            where = f"127.0.0.1:{settings.pg_port}" if settings is not None and not settings.registry_dsn else "the registry's server"
            return (
                f"PostgreSQL ({where}: Airflow's metadata and the model registry) stopped answering: "
                f"{text.removeprefix('(psycopg2.OperationalError) ')}. If the stack is down, start it with "
                "`maas stack up` and run the command again: a run it interrupted is marked failed by the next "
                "`maas run`, and the model servers keep serving what the registry last recorded."
            )
        seen = seen.__cause__ or seen.__context__
    return None


def _write_traceback(settings: Settings | None) -> Path | None:
    """Append the current exception's traceback to ``MAAS_HOME/logs/maas-cli.log``; its path, or None."""
    if settings is None:
        return None
    return append_traceback(settings.home / "logs" / "maas-cli.log", f"maas {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    sys.exit(main())
