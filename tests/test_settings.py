"""Settings from the environment: a `GENQ_*` variable that no setting reads (a misspelling) is
named at start with the closest setting, and refused with GENQ_STRICT_SETTINGS; settings that
contradict each other are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import AliasChoices, Field, ValidationError

from common.settings import Settings
from genq.redis_server import RedisServer
from tests.procs import genq_env, start_gateway

MISSPELT = {"GENQ_MAX_BATCH_SZE": "8"}
NAMED = "GENQ_MAX_BATCH_SZE (did you mean GENQ_MAX_BATCH_SIZE?)"


def test_an_unknown_variable_is_named_with_the_closest_setting() -> None:
    environ = {
        **MISSPELT,
        "genq_redis_url_fil": "/run/secrets/redis",  # read in any case, like the settings
        "GENQ_QQQQQQQQQQQQQQQQQQQQ": "1",  # close to nothing
        "GENQ_FUZZ_SEED": "7",  # genq's own, not a setting
        "GENQ_MAX_BATCH_SIZE": "8",
        "OTHER_MAX_BATCH_SZE": "8",
    }
    assert Settings.unknown_variables(environ) == [
        NAMED,
        "GENQ_QQQQQQQQQQQQQQQQQQQQ",
        "genq_redis_url_fil (did you mean GENQ_REDIS_URL_FILE?)",
    ]


def test_every_setting_s_variable_is_known_secret_files_included() -> None:
    environ = {f"GENQ_{name.upper()}": "x" for name in Settings.model_fields}
    assert "GENQ_API_KEYS_FILE" in environ
    assert Settings.unknown_variables(environ) == []


class Renamed(Settings):
    """A setting read from other variables than its name's, as pydantic-settings reads them."""

    batch_rows: int = Field(1, validation_alias=AliasChoices("GENQ_ROWS", "GENQ_OLD_ROWS"))


def test_a_setting_s_aliases_are_its_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_OLD_ROWS", "5")
    assert Renamed().batch_rows == 5
    assert Renamed.unknown_variables({"GENQ_ROWS": "5", "GENQ_OLD_ROWS": "5"}) == []
    # The aliases replace the field's own name, which pydantic-settings no longer reads.
    monkeypatch.delenv("GENQ_OLD_ROWS")
    monkeypatch.setenv("GENQ_BATCH_ROWS", "5")
    assert Renamed().batch_rows == 1
    assert Renamed.unknown_variables({"GENQ_BATCH_ROWS": "5"}) == [
        "GENQ_BATCH_ROWS (did you mean GENQ_ROWS?)"
    ]


def test_strict_settings_refuse_an_unknown_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MISSPELT.items():
        monkeypatch.setenv(name, value)
    assert Settings().max_batch_size == 32  # a warning (at start), not a refusal
    monkeypatch.setenv("GENQ_STRICT_SETTINGS", "true")
    with pytest.raises(ValidationError, match=r"GENQ_STRICT_SETTINGS: no setting reads .*SIZE\?"):
        Settings()
    monkeypatch.delenv("GENQ_MAX_BATCH_SZE")
    assert Settings().strict_settings


def test_a_gateway_names_a_misspelt_setting_at_start(
    redis_server: RedisServer, log_dir: Path
) -> None:
    gateway, _ = start_gateway(genq_env(redis_server.url, **MISSPELT), log_dir)
    try:
        assert f"genq: warning: no setting reads {NAMED}" in gateway.log.read_text()
    finally:
        gateway.stop()


def test_a_strict_gateway_does_not_start_with_a_misspelt_setting() -> None:
    env = genq_env("redis://unused", GENQ_STRICT_SETTINGS="true", **MISSPELT)
    done = subprocess.run(
        [sys.executable, "-m", "genq", "gateway"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "invalid genq settings" in done.stderr
    assert NAMED in done.stderr


def test_an_event_stream_shorter_than_a_job_s_tokens_is_refused() -> None:
    # A re-run goes on from every event its job published: a trimmed stream would fail it.
    with pytest.raises(ValidationError, match=r"GENQ_EVENTS_MAXLEN \(2048\) must exceed"):
        Settings(events_maxlen=2048, max_new_tokens_limit=2048)
    assert Settings(events_maxlen=2049, max_new_tokens_limit=2048).events_maxlen == 2049
