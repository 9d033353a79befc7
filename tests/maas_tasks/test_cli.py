"""The maas command line: argument handling and the errors a user sees."""

from __future__ import annotations

import pytest

from maas_tasks.cli import CliError, build_parser, main, parse_params
from tests.fixtures.postgres import find_free_port

DEFAULTS = {"epochs": 5, "min_accuracy": 0.7, "model_name": "sentiment", "shuffle": True}


def test_parse_params_types_values_like_their_defaults():
    params = parse_params(["epochs=3", "min_accuracy=0.85", "model_name=spam", "shuffle=false"], DEFAULTS)
    assert params == {"epochs": 3, "min_accuracy": 0.85, "model_name": "spam", "shuffle": False}


@pytest.mark.parametrize(
    "pair, message",
    [
        ("epochs", "is not KEY=VALUE"),
        ("=3", "is not KEY=VALUE"),
        ("epoch=3", "'epoch' is not a parameter of maas_training; known: epochs, min_accuracy"),
        ("epochs=three", "expected a int"),
        ("min_accuracy=high", "expected a float"),
        ("shuffle=maybe", "expected a bool"),
    ],
)
def test_parse_params_rejects_bad_pairs(pair, message):
    with pytest.raises(CliError, match=message):
        parse_params([pair], DEFAULTS)


def test_parser_knows_every_command():
    parser = build_parser()
    assert parser.parse_args(["stack", "up", "--airflow"]).airflow is True
    run = parser.parse_args(["run", "--data", "x.csv", "--text-col", "review", "--param", "epochs=2"])
    assert (run.data, run.text_col, run.param) == ("x.csv", "review", ["epochs=2"])
    assert parser.parse_args(["predict", "a", "b", "--grpc"]).text == ["a", "b"]
    assert parser.parse_args(["models", "--json"]).json is True


def test_run_without_a_stack_says_how_to_start_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    assert main(["run"]) == 2
    assert "the local stack is not running: start it with `maas stack up`" in capsys.readouterr().err


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
