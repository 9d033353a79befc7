"""TF Serving model config file: round trip, entry edits that keep other models, clear errors."""

from __future__ import annotations

import pytest

from serving.model_config import (
    ModelConfigError,
    format_model_config,
    get_model_entry,
    parse_model_config,
    read_model_config,
    set_model_entry,
    single_model_config,
    write_model_config,
)

TWO_MODELS = """
model_config_list {
  config {
    name: "sentiment"
    base_path: "/srv/models/sentiment"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
  config {
    name: "spam"
    base_path: "/srv/models/spam"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
  }
}
"""


def test_write_then_read_round_trips(tmp_path):
    config = parse_model_config(TWO_MODELS)
    path = tmp_path / "conf" / "models.config"
    write_model_config(path, config)
    assert read_model_config(path) == config
    assert [p.name for p in path.parent.iterdir()] == ["models.config"]  # no temporary file left


def test_set_model_entry_replaces_versions_and_keeps_other_models():
    config = parse_model_config(TWO_MODELS)
    updated = set_model_entry(config, "sentiment", "/data/sentiment", [3, 2])
    entry = get_model_entry(updated, "sentiment")
    assert entry.base_path == "/data/sentiment"
    assert list(entry.model_version_policy.specific.versions) == [2, 3]
    assert dict(entry.version_labels) == {"canary": 2}  # the label of the dropped version 1 goes
    assert get_model_entry(updated, "spam") == get_model_entry(config, "spam")
    assert list(get_model_entry(config, "sentiment").model_version_policy.specific.versions) == [1, 2]  # input untouched


def test_set_model_entry_adds_a_new_model():
    updated = set_model_entry(parse_model_config(""), "sentiment", "/data/sentiment", [1])
    text = format_model_config(updated)
    assert 'name: "sentiment"' in text and 'model_platform: "tensorflow"' in text
    assert parse_model_config(text) == updated


def test_set_model_entry_needs_versions():
    with pytest.raises(ModelConfigError, match="at least one"):
        set_model_entry(parse_model_config(""), "sentiment", "/x", [])


def test_single_model_config_uses_latest_policy():
    entry = get_model_entry(single_model_config("sentiment", "/m"), "sentiment")
    assert entry.base_path == "/m" and entry.model_version_policy.WhichOneof("policy_choice") is None


def test_malformed_file_names_path_and_parse_error(tmp_path):
    path = tmp_path / "models.config"
    path.write_text("model_config_list { config { nme: 'x' } }")
    with pytest.raises(ModelConfigError) as info:
        read_model_config(path)
    assert str(path) in str(info.value) and "nme" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelConfigError, match="does not exist"):
        read_model_config(tmp_path / "absent.config")
    assert read_model_config(tmp_path / "absent.config", missing_ok=True) == parse_model_config("")
