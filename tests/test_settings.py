from __future__ import annotations

import pytest

from tokenaudit.settings import SettingsError, load_settings


def test_defaults_and_derived(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENAUDIT_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.window_seconds == 60
    assert s.effective_clickhouse_dsn == f"chdb://{tmp_path.resolve()}/clickhouse"
    assert s.topic_usage == "token-usage"


@pytest.mark.parametrize(
    ("var", "value", "expect"),
    [
        ("TOKENAUDIT_WINDOW_SECONDS", "abc", "TOKENAUDIT_WINDOW_SECONDS"),
        ("TOKENAUDIT_WINDOW_SECONDS", "0", "greater than or equal to 1"),
        ("TOKENAUDIT_HTTP_PORT", "70000", "TOKENAUDIT_HTTP_PORT"),
        ("TOKENAUDIT_KAFKA_BOOTSTRAP", "nohostport", "TOKENAUDIT_KAFKA_BOOTSTRAP"),
        ("TOKENAUDIT_KAFKA_HEAP", "lots", "TOKENAUDIT_KAFKA_HEAP"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch, var, value, expect):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=expect):
        load_settings()


def test_toml_file_then_env_override(tmp_path, monkeypatch):
    cfg = tmp_path / "s.toml"
    cfg.write_text("window_seconds = 30\nhttp_port = 9000\n")
    monkeypatch.setenv("TOKENAUDIT_CONFIG", str(cfg))
    monkeypatch.setenv("TOKENAUDIT_HTTP_PORT", "9100")
    s = load_settings()
    assert (s.window_seconds, s.http_port) == (30, 9100)


def test_missing_toml_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENAUDIT_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsError, match="TOKENAUDIT_CONFIG"):
        load_settings()
