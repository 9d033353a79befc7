"""The maas command line: argument handling and the errors a user sees."""

from __future__ import annotations

import pytest

from maas_tasks.cli import CliError, build_parser, main, parse_params
from tests.fixtures.postgres import find_free_port

def make_params():
    from airflow.sdk import Param
    from airflow.sdk.definitions.param import ParamsDict

    return ParamsDict({
        "epochs": Param(5, type="integer", enum=list(range(1, 51)), description="A whole number from 1 to 50."),
        "min_accuracy": Param(0.7, type="number", minimum=0, maximum=1, description="From 0 to 1."),
        "model_name": Param(None, type=["null", "string"], pattern="^[a-z]+$", description="Lowercase letters."),
        "batch_size": Param(64, type="integer", enum=[32, 64, 128]),
        "shuffle": Param(True, type="boolean"),
    })


def test_parse_params_types_values_by_their_schema():
    params = parse_params(["epochs=3", "min_accuracy=0.85", "model_name=spam", "shuffle=false"], make_params())
    assert params == {"epochs": 3, "min_accuracy": 0.85, "model_name": "spam", "shuffle": False}
    assert parse_params(["model_name="], make_params()) == {"model_name": None}  # nullable: empty is None


@pytest.mark.parametrize(
    "pair, message",
    [
        ("epochs", "is not KEY=VALUE"),
        ("=3", "is not KEY=VALUE"),
        ("epoch=3", "'epoch' is not a parameter of maas_training; known: batch_size, epochs, min_accuracy"),
        ("epochs=three", "--param epochs='three': expected integer"),
        ("min_accuracy=high", "expected number"),
        ("shuffle=maybe", "expected boolean"),
        # Out of the schema's limits: one sentence, then the param's own description of its limits.
        ("epochs=0", r"--param epochs='0': 0 is not a whole number from 1 to 50 \(A whole number from 1 to 50.\)"),
        ("batch_size=100", "100 is not one of 32, 64, 128"),
        ("min_accuracy=2", r"2.0 is greater than the maximum of 1 \(From 0 to 1.\)"),
        ("model_name=Bad Name", r"'Bad Name' is not allowed \(Lowercase letters.\)"),
    ],
)
def test_parse_params_rejects_bad_pairs(pair, message):
    with pytest.raises(CliError, match=message) as raised:
        parse_params([pair], make_params())
    assert "Failed validating" not in str(raised.value)  # no jsonschema dump


def test_parser_knows_every_command():
    parser = build_parser()
    assert parser.parse_args(["stack", "up", "--airflow"]).airflow is True
    run = parser.parse_args(["run", "--data", "x.csv", "--text-col", "review", "--param", "epochs=2", "--verbose"])
    assert (run.data, run.text_col, run.param, run.verbose, run.quiet) == ("x.csv", "review", ["epochs=2"], True, False)
    assert parser.parse_args(["predict", "a", "b", "--grpc"]).text == ["a", "b"]
    assert parser.parse_args(["models", "--json"]).json is True


def test_run_without_a_stack_says_how_to_start_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    assert main(["run"]) == 2
    assert "the local stack is not running: start it with `maas stack up`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing.csv"], "missing.csv does not exist"),
        (["--data", "{tmp}/empty"], "holds no data files"),
        (["--data", "{tmp}/book.xlsx"], "book.xlsx: unsupported file type"),
        (["--data", "{tmp}/none-*.csv"], "matches no data files"),
        (["--model", "models.config"], "--model 'models.config' ends with '.config'"),
        (["--model", "../evil"], "is not a valid model name"),
        (["--label-map", "0=negative"], "names one class"),
        (["--label-map", "0=negative,1"], "'1' is not RAW=NAME"),
    ],
)
def test_run_usage_errors_exit_2_before_anything_starts(monkeypatch, tmp_path, capsys, args, message):
    # No stack runs here: each answer comes before the stack (or Airflow) is looked at.
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "home"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "book.xlsx").write_bytes(b"PK\x03\x04")
    assert main(["run", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maas: error: ") and message in err and "Traceback" not in err
    assert "stack is not running" not in err


def test_bad_setting_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setenv("MAAS_GRPC_PORT", "grpc")
    assert main(["models"]) == 2
    assert "MAAS_GRPC_PORT='grpc' is not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("api", [[], ["--grpc"]], ids=["rest", "grpc"])
def test_predict_against_no_server_fails_clearly(monkeypatch, capsys, api):
    monkeypatch.setenv("MAAS_REST_PORT", str(find_free_port()))
    monkeypatch.setenv("MAAS_GRPC_PORT", str(find_free_port()))
    assert main(["predict", "some text", *api]) == 1
    err = capsys.readouterr().err
    assert err.startswith("maas: error:") and "127.0.0.1" in err


def test_the_run_summary_says_where_the_data_came_from_and_what_was_set_aside():
    from maas_tasks.cli import format_data_lines

    snapshot = {
        "id": 4, "source": "reviews.csv", "rows": 400, "metadata": {"dag_run_id": "run-1"},
        "quarantined_rows": 8, "quarantine_uri": "file:///s/quarantine/x/rows.parquet",
        "docs_uri": "file:///s/validation/x/docs/v.html", "drift_uri": "file:///s/drift/y/report.json",
        "drift": {"compared": True, "flagged": True, "reasons": ["label shares moved (p=0.0001)"],
                  "html_uri": "file:///s/drift/y/report.html"},
    }
    lines = format_data_lines(snapshot, "run-1")
    assert lines[0] == "data       snapshot 4 of reviews.csv: 400 rows (new)"
    assert "8 rows quarantined: file:///s/quarantine/x/rows.parquet" in lines[1]
    assert "Data Docs: file:///s/validation/x/docs/v.html" in lines[2]
    assert lines[3] == "drift      FLAGGED: label shares moved (p=0.0001) (file:///s/drift/y/report.html)"
    again = format_data_lines({**snapshot, "quarantined_rows": 0, "drift": {}}, "run-2")
    assert again == ["data       snapshot 4 of reviews.csv: 400 rows (already ingested by run run-1)",
                     "           Data Docs: file:///s/validation/x/docs/v.html"]


def test_stack_commands_address_the_running_stack_and_refuse_an_executor_without_airflow(monkeypatch, tmp_path, capsys):
    import json

    from maas_tasks import stack
    from maas_tasks.config import load_settings

    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    assert main(["stack", "up", "--executor", "celery"]) == 2
    assert "use it with --airflow" in capsys.readouterr().err
    recorded = load_settings({"MAAS_HOME": str(tmp_path), "MAAS_GRPC_PORT": str(find_free_port())})
    stack.write_stack_state(recorded)
    stack._start_process(recorded, stack.SERVER_NAME, ["sleep", "60"], {"PATH": "/usr/bin:/bin"})
    try:
        monkeypatch.setenv("MAAS_GRPC_PORT", str(find_free_port()))  # another stack's port
        assert main(["stack", "status", "--json"]) == 0
        captured = capsys.readouterr()
        assert f"was started with MAAS_GRPC_PORT={recorded.grpc_port}; using the running stack's value" in captured.err
        assert json.loads(captured.out)["model-server"]["grpc"] == recorded.grpc_target
        assert main(["models"]) == 2
        assert "Unset the variable" in capsys.readouterr().err
    finally:
        stack._stop_process(recorded, stack.SERVER_NAME)


def test_a_command_that_loses_postgresql_says_so_in_one_paragraph(monkeypatch, tmp_path, capsys):
    import psycopg2

    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    port = find_free_port()
    monkeypatch.setenv("MAAS_PG_PORT", str(port))
    try:
        psycopg2.connect(host="127.0.0.1", port=port, dbname="maas", connect_timeout=2)
    except psycopg2.OperationalError as lost:
        error = lost

    def lose_the_database(args, settings):
        raise RuntimeError("task instance heartbeat failed") from error  # as Airflow chains it

    monkeypatch.setattr("maas_tasks.cli.cmd_models", lose_the_database)  # the parser takes it when main builds it
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert f"PostgreSQL (127.0.0.1:{port}: Airflow's metadata and the model registry) stopped answering" in err
    assert "Connection refused" in err and "maas stack up" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("maas: error:")]) == 1
