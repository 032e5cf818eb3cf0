"""The one config loader: DISTILL_ environment variables, overrides on top, clear errors."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.config import CHECKPOINTS, PROMPTS, TOPICS, CommonSettings, load


def test_defaults_serve_the_local_stack(monkeypatch):
    for key in ("DISTILL_KAFKA_BOOTSTRAP", "DISTILL_TOPIC_PREFIX", "DISTILL_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    s = CommonSettings()
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.topic(PROMPTS) == "distill.prompts"
    assert s.topic(CHECKPOINTS) == "distill.checkpoints"
    assert s.data_dir == Path(".distill")


def test_environment_with_prefix(monkeypatch):
    monkeypatch.setenv("DISTILL_KAFKA_BOOTSTRAP", "broker:29092")
    monkeypatch.setenv("DISTILL_TOPIC_PREFIX", "lab7.")
    monkeypatch.setenv("DISTILL_LOG_LEVEL", "DEBUG")
    s = CommonSettings()
    assert s.kafka_bootstrap == "broker:29092"
    assert s.topic(PROMPTS) == "lab7.prompts"
    assert s.log_level == "DEBUG"


def test_overrides_beat_environment_and_none_is_ignored(monkeypatch):
    monkeypatch.setenv("DISTILL_KAFKA_BOOTSTRAP", "env:1")
    assert load(CommonSettings, kafka_bootstrap="flag:2").kafka_bootstrap == "flag:2"
    assert load(CommonSettings, kafka_bootstrap=None).kafka_bootstrap == "env:1"


def test_bad_values_are_refused_with_the_field_named(monkeypatch):
    monkeypatch.setenv("DISTILL_LOG_LEVEL", "LOUD")
    with pytest.raises(ValidationError, match="log_level"):
        CommonSettings()
    monkeypatch.delenv("DISTILL_LOG_LEVEL")
    with pytest.raises(ValidationError, match="DISTILL_KAFKA_BOOTSTRAP"):
        CommonSettings(kafka_bootstrap="  ")


def test_settings_are_frozen_and_secrets_hidden():
    s = CommonSettings(kafka_sasl_password="hunter2")
    with pytest.raises(ValidationError):
        s.kafka_bootstrap = "x:1"
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s.model_dump())


def test_unknown_topic_is_an_error():
    with pytest.raises(ValueError, match="unknown topic"):
        CommonSettings().topic("nope")
    assert len(set(TOPICS)) == 5
