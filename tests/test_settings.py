"""Configuration details: which environment variables are settings, which are ours but not settings, and
that no string from the configuration or the environment is ever echoed in an error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle.app.settings import ConfigError, Settings, load

TOKEN = "t" * 32


def config(tmp_path: Path, key_env: str = "MAIN_KEY", secret_env: str = "MAIN_SECRET", extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(extra + f'[[accounts]]\nname = "m"\nsymbols = ["BTCUSDT"]\napi_key_env = "{key_env}"\n'
                    f'secret_env = "{secret_env}"\n')
    return path


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIN_KEY", "k")
    monkeypatch.setenv("MAIN_SECRET", "s")
    monkeypatch.setenv("LIFECYCLE_API_TOKEN", TOKEN)


def test_variables_the_configuration_names_may_carry_our_prefix(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFECYCLE_MAIN_KEY", "k")
    monkeypatch.setenv("LIFECYCLE_MAIN_SECRET", "s")
    monkeypatch.setenv("LIFECYCLE_CONTROL_TOKEN", TOKEN)
    settings = load(config(tmp_path, "LIFECYCLE_MAIN_KEY", "LIFECYCLE_MAIN_SECRET",
                           '[api]\ntoken_env = "LIFECYCLE_CONTROL_TOKEN"\n'))
    assert settings.accounts[0].api_key_env == "LIFECYCLE_MAIN_KEY"


def test_whole_sections_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFECYCLE_ACCOUNTS", json.dumps(
        [{"name": "m", "symbols": ["BTCUSDT"], "api_key_env": "MAIN_KEY", "secret_env": "MAIN_SECRET"}]))
    monkeypatch.setenv("LIFECYCLE_API__PORT", "9000")
    settings = load(None)
    assert settings.api.port == 9000 and settings.accounts[0].name == "m"
    monkeypatch.setenv("LIFECYCLE_ACCOUNTS", "not json")
    with pytest.raises(ConfigError, match="environment"):
        load(None)


def test_a_lower_case_typo_is_refused_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("lifecycle_schedule_sync_interval_s", "5")
    with pytest.raises(ConfigError, match="lifecycle_schedule_sync_interval_s is not a setting"):
        load(config(tmp_path))


def test_no_string_is_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("LIFECYCLE_API__HOST", "SuperSecretToken123"), ("LIFECYCLE_API__TOKEN", "SuperSecret2")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError) as refused:
            load(config(tmp_path))
        assert value not in str(refused.value) and str(refused.value).startswith("api")
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as refused:
        load(config(tmp_path, extra='[[accounts]]\nname = "m"\nsymbols = ["X"]\napi_key_env = "A"\n'
                                    'secret_env = "B"\n'))
    assert "unique" in str(refused.value)


def test_the_demo_settings_follow_no_environment_even_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIFECYCLE_API__PORT", "1")
    monkeypatch.setenv("LIFECYCLE_RECONCILE__PHANTOM_AFTER_S", "999")
    monkeypatch.setenv("LIFECYCLE_ACCOUNTS", "not json")
    settings = Settings.without_environment(accounts=[
        {"name": "d", "symbols": ["BTCUSDT"], "api_key_env": "K", "secret_env": "S"}])
    assert settings.api.port == 8780 and settings.reconcile.phantom_after_s == 60


def test_a_cluster_section_needs_postgresql_and_timings_that_hold_a_lease(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cluster: several processes share accounts only on PostgreSQL"):
        load(config(tmp_path, extra='[cluster]\ninstance = "a"\n'), check_secrets=False)
    pg = 'database_url = "postgresql://postgres@127.0.0.1/test"\n'
    with pytest.raises(ConfigError, match=r"cluster: .*lease_s .* must be at least margin_s"):
        load(config(tmp_path, extra=pg + '[cluster]\nlease_s = 3\nrenew_s = 1\nmargin_s = 2\n'),
             check_secrets=False)
    with pytest.raises(ConfigError, match=r"cluster\.instance"):
        load(config(tmp_path, extra=pg + '[cluster]\ninstance = "has space"\n'), check_secrets=False)
    settings = load(config(tmp_path, extra=pg + '[cluster]\ninstance = "east-1"\nmax_accounts = 50\n'),
                    check_secrets=False)
    assert settings.cluster is not None and settings.cluster.config().instance == "east-1"


@pytest.mark.parametrize("where", ["a file", "under a file", "a dangling link"])
@pytest.mark.parametrize("key", ["log_dir", "records.dir"])
def test_a_directory_setting_naming_a_file_is_one_line_before_anything_is_created(tmp_path: Path, key: str,
                                                                                   where: str) -> None:
    """Review, seventh session: the start failed half-way (a traceback, exit 1, the database created)."""
    (tmp_path / "a-file").write_text("not a directory")
    if where == "a dangling link":
        (tmp_path / "a-link").symlink_to(tmp_path / "nowhere")
    taken = {"a file": tmp_path / "a-file", "under a file": tmp_path / "a-file" / "logs",
             "a dangling link": tmp_path / "a-link"}[where]
    path = config(tmp_path, extra=f'log_dir = "{taken}"\n' if key == "log_dir" else "")
    if key == "records.dir":
        path.write_text(path.read_text() + f'[records]\ndir = "{taken}"\n')
    why = {"a file": "exists and is not a directory", "under a file": "cannot be made: .* is not a directory",
           "a dangling link": "is a symbolic link to nothing"}[where]
    with pytest.raises(ConfigError, match=rf"^{key}: .*{taken} {why}"):
        load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a-file", "c.toml"]
                                                                + (["a-link"] if where == "a dangling link" else []))


def test_one_venue_account_configured_twice_is_refused_without_its_key(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Review, seventh session: two [[accounts]] with one key each took the other's positions for untracked ones
    (with `adopt`, both placed a stop on one position)."""
    monkeypatch.setenv("MAIN_KEY", "KEY-SHARED-123")
    monkeypatch.setenv("OTHER_KEY", "KEY-SHARED-123")
    monkeypatch.setenv("OTHER_SECRET", "s2")
    path = config(tmp_path)
    path.write_text(path.read_text() + '[[accounts]]\nname = "n"\nsymbols = ["ETHUSDT"]\napi_key_env = "OTHER_KEY"\n'
                    'secret_env = "OTHER_SECRET"\n')
    with pytest.raises(ConfigError, match=r"^accounts\.1 \(n\): the same API key on the same exchange as accounts\.0 "
                                          r"\(m\)") as refused:
        load(path)
    assert "KEY-SHARED" not in str(refused.value)
    monkeypatch.setenv("OTHER_KEY", "KEY-OTHER-456")
    assert [a.name for a in load(path).accounts] == ["m", "n"]
