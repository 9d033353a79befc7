"""Settings: defaults, overrides and the errors a user sees for malformed values."""

from __future__ import annotations

import pytest

from maas_tasks.config import ConfigError, check_model_name, load_settings


def test_defaults(tmp_path):
    s = load_settings({"MAAS_HOME": str(tmp_path)})
    assert s.store_url == f"file://{tmp_path / 'store'}"
    assert (s.grpc_target, s.rest_url) == ("127.0.0.1:8500", "http://127.0.0.1:8501")
    assert s.model_name == "sentiment"
    assert s.serving_dir == tmp_path / "serving" / "models"
    assert s.serving_config == s.serving_dir / "models.config"
    assert s.device == "auto" and s.registry_dsn is None
    assert s.s3_timeout == 60.0 and load_settings({"MAAS_HOME": str(tmp_path), "MAAS_S3_TIMEOUT": "2.5"}).s3_timeout == 2.5


def test_overrides(tmp_path):
    s = load_settings({
        "MAAS_HOME": str(tmp_path), "MAAS_GRPC_PORT": "9500", "MAAS_REST_PORT": "9501",
        "MAAS_MODEL_NAME": "spam", "MAAS_STORE_URL": "s3://bkt/p", "MAAS_DEVICE": "CPU",
        "MAAS_SERVING_DIR": str(tmp_path / "srv"),
    })
    assert (s.grpc_port, s.rest_port, s.model_name, s.store_url, s.device) == (9500, 9501, "spam", "s3://bkt/p", "cpu")
    assert s.serving_config == tmp_path / "srv" / "models.config"


def test_settings_are_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    monkeypatch.setenv("MAAS_MODEL_NAME", "first")
    assert load_settings().model_name == "first"
    monkeypatch.setenv("MAAS_MODEL_NAME", "second")
    assert load_settings().model_name == "second"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MAAS_GRPC_PORT": "http"}, "MAAS_GRPC_PORT='http' is not an integer"),
        ({"MAAS_REST_PORT": "70000"}, "outside 1-65535"),
        ({"MAAS_STORE_URL": "gs://x"}, "use file:///absolute/dir or s3://bucket"),
        ({"MAAS_DEVICE": "tpu"}, "MAAS_DEVICE='tpu' is not one of auto, cpu, gpu"),
        ({"MAAS_S3_TIMEOUT": "0"}, "MAAS_S3_TIMEOUT='0' is not a positive number of seconds"),
        ({"MAAS_S3_TIMEOUT": "-1"}, "MAAS_S3_TIMEOUT='-1' is not a positive number of seconds"),
        ({"MAAS_S3_TIMEOUT": "soon"}, "MAAS_S3_TIMEOUT='soon' is not a positive number of seconds"),
        ({"MAAS_S3_TIMEOUT": "inf"}, "MAAS_S3_TIMEOUT='inf' is not a positive number of seconds"),
    ],
)
def test_malformed_values_name_the_variable(env, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings({"MAAS_HOME": str(tmp_path), **env})


@pytest.mark.parametrize("name", ["sentiment", "reviews-v2", "a.b_c", "x" * 64])
def test_valid_model_names(name):
    assert check_model_name(name) == name
    assert load_settings({"MAAS_MODEL_NAME": name}).model_name == name


@pytest.mark.parametrize("name", ["bad name!", "-leading-dash", "x" * 65, "a/b"])
def test_bad_model_names_say_what_a_name_may_hold(name):
    with pytest.raises(ConfigError, match=r"MAAS_MODEL_NAME .* is not a valid model name: use 1 to 64 letters"):
        load_settings({"MAAS_MODEL_NAME": name})


@pytest.mark.parametrize("name", ["models.config", "models.config.lock", "Sentiment.CONFIG", "x.tmp"])
def test_names_that_would_collide_with_the_serving_side_files_are_refused(name):
    import re

    from maas_tasks.config import MODEL_NAME_PATTERN

    with pytest.raises(ConfigError, match=r"like the files the model servers keep .* choose another name"):
        check_model_name(name, "--model")
    assert not re.fullmatch(MODEL_NAME_PATTERN, name.lower())  # the DAG Param's pattern refuses it too


def test_label_maps_parse_to_raw_label_and_class_name():
    from maas_tasks.config import parse_label_map

    assert parse_label_map(" 0 = negative, 1=positive ") == {"0": "negative", "1": "positive"}
    assert parse_label_map("pos=positive,neg=negative,good=positive") == {
        "pos": "positive", "neg": "negative", "good": "positive"}
    assert parse_label_map(None) is None and parse_label_map("  ") is None


@pytest.mark.parametrize(
    "text, message",
    [("0=negative,1", "'1' is not RAW=NAME"), ("0=,1=positive", "'0=' is not RAW=NAME"),
     ("0=a,0=b", "the label '0' is mapped twice"), ("0=same,1=same", "names one class")],
)
def test_bad_label_maps_say_what_is_wrong(text, message):
    from maas_tasks.config import parse_label_map

    with pytest.raises(ConfigError, match=message):
        parse_label_map(text)


def test_settings_survive_the_trip_through_a_child_process_environment(tmp_path):
    from maas_tasks.config import settings_environment

    settings = load_settings({"MAAS_HOME": str(tmp_path), "MAAS_GRPC_PORT": "9500", "MAAS_NODE_ID": "",
                              "MAAS_S3_ENDPOINT": "http://127.0.0.1:9000"})
    assert load_settings(settings_environment(settings)) == settings
    assert load_settings(settings_environment(load_settings({"MAAS_HOME": str(tmp_path)}))).node_id == "local"


def test_retraining_settings_defaults_and_overrides(tmp_path):
    from maas_tasks.config import load_retraining_settings

    defaults = load_retraining_settings({"MAAS_HOME": str(tmp_path)})
    assert (defaults.training_schedule, defaults.ingest_schedule, defaults.housekeeping_schedule) == (
        "@weekly", "*/5 * * * *", "0 3 * * *"
    )
    assert defaults.ingest_source == str(tmp_path / "incoming")
    assert (defaults.retrain_on, defaults.keep_versions, defaults.model_name) == ("new_data", 5, "sentiment")
    given = load_retraining_settings({
        "MAAS_HOME": str(tmp_path), "MAAS_TRAINING_SCHEDULE": "none", "MAAS_INGEST_SCHEDULE": " 0  * * * * ",
        "MAAS_HOUSEKEEPING_SCHEDULE": "@daily", "MAAS_INGEST_SOURCE": "s3://bucket/in", "MAAS_RETRAIN_ON": "Drift",
        "MAAS_KEEP_VERSIONS": "2", "MAAS_MODEL_NAME": "reviews",
    })
    assert (given.training_schedule, given.ingest_schedule, given.housekeeping_schedule) == (None, "0 * * * *", "@daily")
    assert (given.ingest_source, given.retrain_on, given.keep_versions, given.model_name) == (
        "s3://bucket/in", "drift", 2, "reviews"
    )


@pytest.mark.parametrize(
    "env, message",
    [({"MAAS_TRAINING_SCHEDULE": "every sunday"}, "MAAS_TRAINING_SCHEDULE='every sunday' is not a cron expression"),
     ({"MAAS_INGEST_SCHEDULE": "61 * * * *"}, "MAAS_INGEST_SCHEDULE"),
     ({"MAAS_RETRAIN_ON": "always"}, "MAAS_RETRAIN_ON='always' is not one of new_data, drift"),
     ({"MAAS_KEEP_VERSIONS": "0"}, "MAAS_KEEP_VERSIONS='0' is not a whole number from 1 to 1000"),
     ({"MAAS_KEEP_VERSIONS": "two"}, "MAAS_KEEP_VERSIONS='two'")],
)
def test_bad_retraining_settings_name_the_variable(env, message, tmp_path):
    from maas_tasks.config import load_retraining_settings

    with pytest.raises(ConfigError, match=message):
        load_retraining_settings({"MAAS_HOME": str(tmp_path), **env})
