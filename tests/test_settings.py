"""Settings come from CAMPSEARCH_* variables and refuse unsafe combinations at start-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CAMPSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CAMPSEARCH_REDIS_URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("CAMPSEARCH_API_KEYS", "a-key-of-sixteen-chars, another-long-enough-key")
    settings = Settings(_env_file=None)
    assert settings.data_dir == tmp_path
    assert settings.redis_url == "redis://127.0.0.1:6390/0"
    assert [key.get_secret_value() for key in settings.api_keys] == [
        "a-key-of-sixteen-chars",
        "another-long-enough-key",
    ]
    assert settings.writes_need_key


def test_keys_never_show_in_the_settings_repr() -> None:
    settings = Settings(_env_file=None, api_keys=["super-secret-value-123"])
    assert "super-secret-value-123" not in repr(settings)


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(_env_file=None, api_keys=["short"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_without_keys_is_allowed(host: str) -> None:
    assert not Settings(_env_file=None, host=host).writes_need_key


def test_public_bind_without_keys_is_refused_unless_explicit() -> None:
    with pytest.raises(ValidationError, match="refusing to bind"):
        Settings(_env_file=None, host="0.0.0.0")
    assert Settings(_env_file=None, host="0.0.0.0", allow_anonymous_writes=True).host == "0.0.0.0"
    assert Settings(_env_file=None, host="0.0.0.0", api_keys=["k" * 16]).writes_need_key
