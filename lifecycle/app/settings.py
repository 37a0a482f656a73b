"""The service's configuration: one TOML file plus environment variables, typed and checked before
anything starts.

Environment variables override the file: `LIFECYCLE_<KEY>`, nested with `__`
(`LIFECYCLE_SCHEDULE__SYNC_INTERVAL_S=5`, `LIFECYCLE_DATABASE_URL=...`). API keys are never written in
the file: each account names the environment variables (or files) that hold its key and secret, and
`load()` reads them. Every problem is reported as one line naming the key (`ConfigError`); unknown keys
are errors, not ignored.

Example (see `deploy/binance-testnet.toml` for a complete one):

    database_url = "sqlite:///lifecycle.sqlite"
    log_dir = "logs"

    [[accounts]]
    name = "testnet"
    exchange = "binanceusdm"
    sandbox = true
    symbols = ["BTCUSDT", "ETHUSDT"]
    api_key_env = "BINANCE_TESTNET_KEY"
    secret_file = "/etc/lifecycle/testnet.secret"
"""
from __future__ import annotations

import ipaddress
import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from exchange.ccxt_adapter import ExchangeSettings
from exchange.secret import Secret
from lifecycle.app.leases import ClusterConfig
from lifecycle.app.service import AccountConfig, ApiBinding, ServiceConfig, default_instance
from lifecycle.live import LiveConfig
from lifecycle.reconciler import ReconcileConfig
from scheduler.jobs import ScheduleConfig

DEFAULT_DATABASE_URL = "sqlite:///lifecycle.sqlite"  # a file in the working directory


class ConfigError(Exception):
    """One line naming the key and the problem; the service does not start."""


_ENV_NAME = r"^[A-Z_][A-Z0-9_]{0,127}$"  # an environment variable's NAME (a pasted key has lower case)
# Environment variables with our prefix that are not settings but are ours all the same.
_OTHER_ENV = ("LIFECYCLE_CONFIG", "LIFECYCLE_API_TOKEN", "LIFECYCLE_DEMO_", "LIFECYCLE_TEST_",
              "LIFECYCLE_REQUIRE_POSTGRES", "LIFECYCLE_REQUIRE_BROWSER", "LIFECYCLE_CHROMIUM", "LIFECYCLE_CHROMEDRIVER")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AccountSettings(_Strict):
    name: str = Field(min_length=1, max_length=64)
    exchange: str = "binanceusdm"  # a ccxt exchange id with WebSocket support
    sandbox: bool = False  # the exchange's testnet
    symbols: list[str] = Field(min_length=1)
    urls: dict[str, str] = Field(default_factory=dict)  # ccxt URL overrides (e.g. the simulator's)
    api_key_env: str | None = Field(default=None, pattern=_ENV_NAME)  # the variable holding the API key ...
    api_key_file: Path | None = None  # ... or a file holding it (one line)
    secret_env: str | None = Field(default=None, pattern=_ENV_NAME)
    secret_file: Path | None = None
    rate_limit: bool = True  # ccxt's pacing by the venue's request weights; keep it on against a real venue
    reconnect_backoff_max_s: float = Field(default=30.0, gt=0, le=600)  # longest wait between reconnections
    user_probe_after_s: float = Field(default=30.0, gt=0, le=3600)  # user-data stream idle this long: probe its key
    # keep the listen key alive this often whatever the traffic (Binance expires a key 60 min after the last one)
    listen_key_keepalive_s: float = Field(default=1800.0, gt=0, lt=3600)
    market_silent_after_s: float = Field(default=10.0, gt=0, le=3600)  # no mark price this long: reconnect

    @field_validator("exchange")
    @classmethod
    def _known_exchange(cls, value: str) -> str:
        import ccxt.pro

        if value not in ccxt.pro.exchanges:
            raise ValueError("not a ccxt exchange with WebSocket support (e.g. binanceusdm)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_keys_in_the_file(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("api_key", "secret", "apiKey", "api_secret"):
                if key in data:
                    raise ValueError(f"'{key}' must not be written in the configuration; name an environment "
                                     "variable (api_key_env / secret_env) or a file (api_key_file / secret_file)")
        return data

    @model_validator(mode="after")
    def _one_source_each(self) -> AccountSettings:
        for what in ("api_key", "secret"):
            env, file = getattr(self, f"{what}_env"), getattr(self, f"{what}_file")
            if env and file:
                raise ValueError(f"give {what}_env or {what}_file, not both")
            if not env and not file:
                raise ValueError(f"no {what}: set {what}_env (an environment variable) or {what}_file")
        return self


# The [live] section is the live engine's own LiveConfig (lifecycle/live/config.py), the one home of its keys,
# defaults and limits: pydantic validates the section into a LiveConfig from its fields, their types and the
# limits in their metadata (with the same messages as any other section). The old name stays for callers.
LiveSettings = LiveConfig


class TrailingSettings(_Strict):
    """Defaults for open commands that ask for a trailing stop (`"trailing": true`) without its parameters:
    it activates `activation_pct` in profit from the mark at the time of the command."""

    activation_pct: Decimal = Field(default=Decimal("0.5"), gt=0, lt=100)  # from the entry, in profit
    callback_rate: Decimal = Field(default=Decimal("0.5"), gt=0, lt=100)  # percent behind the watermark


# The [schedule] and [reconcile] sections are, like [live], the components' own configuration dataclasses
# (scheduler/jobs.py, lifecycle/reconciler.py): their fields, defaults and limits are stated once, there.
ScheduleSettings = ScheduleConfig
ReconcileSettings = ReconcileConfig


class ApiSettings(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8780, ge=0, le=65535)
    token_env: str = Field(default="LIFECYCLE_API_TOKEN", pattern=_ENV_NAME)  # the variable holding the token
    token_file: Path | None = None  # ... or a file holding it
    allow_remote: bool = False  # a non-loopback host is refused unless this is true

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> ApiSettings:
        if not self.allow_remote and not _is_loopback(self.host):
            raise ValueError("host is not a loopback address; set allow_remote = true to expose the control API "
                             "beyond this machine")
        return self


class ClusterSettings(_Strict):
    """`[cluster]`: this process as one of several sharing the accounts of one PostgreSQL database (leases:
    see lifecycle/app/leases.py and the README's "Scale out"). Without the section, a PostgreSQL service uses
    these defaults and the name host-pid; SQLite cannot (one process per file)."""

    instance: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@:-]+$")
    lease_s: float = Field(default=10.0, gt=0, le=600)
    renew_s: float = Field(default=2.0, gt=0, le=120)
    margin_s: float = Field(default=2.0, gt=0, le=120)
    max_accounts: int = Field(default=0, ge=0)  # 0: no limit but the share
    start_concurrency: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _consistent(self) -> ClusterSettings:
        self.config()  # the timing rules live in ClusterConfig
        return self

    def config(self) -> ClusterConfig:
        return ClusterConfig(instance=self.instance or default_instance(), lease_s=self.lease_s,
                             renew_s=self.renew_s, margin_s=self.margin_s, max_accounts=self.max_accounts,
                             start_concurrency=self.start_concurrency)


def _a_directory(path: Path) -> Path:
    """A directory the service creates if needed: refused when something that is not a directory is there (it
    failed half-way through the start with a traceback, the database already created; review, seventh
    session)."""
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{path} is a symbolic link to nothing")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    for parent in path.parents:  # the first that exists must be a directory to make the rest in
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"{path} cannot be made: {parent} is not a directory")
            break
    return path


class RecordsSettings(_Strict):
    dir: Path = Path("records")
    retention_days: int = Field(default=30, ge=1, le=3650)

    _directory = field_validator("dir")(_a_directory)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIFECYCLE_", env_nested_delimiter="__", extra="forbid",
                                      frozen=True, allow_inf_nan=False)

    database_url: str = DEFAULT_DATABASE_URL
    log_dir: Path = Path("logs")
    log_retention_days: int = Field(default=14, ge=1, le=3650)
    shutdown_drain_s: float = Field(default=10.0, ge=0, le=3600)
    storage_timeout_s: float = Field(default=0.5, gt=0, le=60)  # a slower database write is queued, not awaited
    accounts: list[AccountSettings] = Field(min_length=1)
    live: LiveConfig = Field(default_factory=LiveConfig)
    trailing: TrailingSettings = Field(default_factory=TrailingSettings)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    reconcile: ReconcileConfig = Field(default_factory=ReconcileConfig)
    api: ApiSettings = Field(default_factory=ApiSettings)
    records: RecordsSettings = Field(default_factory=RecordsSettings)
    cluster: ClusterSettings | None = None

    @model_validator(mode="after")
    def _cluster_needs_postgresql(self) -> Settings:
        if self.cluster is not None and not self.database_url.startswith(("postgresql", "postgres")):
            raise ValueError("cluster: several processes share accounts only on PostgreSQL (database_url is not "
                             "postgresql://...); SQLite is one process per database file")
        return self

    _log_directory = field_validator("log_dir")(_a_directory)

    @field_validator("accounts")
    @classmethod
    def _unique_names(cls, accounts: list[AccountSettings]) -> list[AccountSettings]:
        names = [a.name for a in accounts]
        if len(set(names)) != len(names):
            raise ValueError("account names must be unique")
        return accounts

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings  # the environment overrides the file (passed as init values)

    @classmethod
    def without_environment(cls, **data: Any) -> Settings:
        """These values only, whatever LIFECYCLE_* variables say (the demo must not follow a production
        environment into its database or records)."""
        return _NoEnvironment(**data)

    # --- what the service needs ----------------------------------------------------------------------

    def exchange_settings(self, account: AccountSettings, environ: dict[str, str] | None = None) -> ExchangeSettings:
        """The adapter's settings, with the key and secret read now (ConfigError naming the source)."""
        environ = dict(os.environ) if environ is None else environ
        index = self.accounts.index(account)
        key = _read_secret(f"accounts.{index}.api_key", account.api_key_env, account.api_key_file, environ)
        secret = _read_secret(f"accounts.{index}.secret", account.secret_env, account.secret_file, environ)
        return ExchangeSettings(exchange_id=account.exchange, api_key=Secret(key), secret=Secret(secret),
                                sandbox=account.sandbox, urls=dict(account.urls), rate_limit=account.rate_limit,
                                backoff_max_s=account.reconnect_backoff_max_s,
                                user_probe_after_s=account.user_probe_after_s,
                                listen_key_keepalive_s=account.listen_key_keepalive_s,
                                market_silent_after_s=account.market_silent_after_s)

    def api_token(self, environ: dict[str, str] | None = None) -> Secret:
        environ = dict(os.environ) if environ is None else environ
        env = None if self.api.token_file else self.api.token_env
        return Secret(_read_secret("api.token", env, self.api.token_file, environ))

    def live_config(self) -> LiveConfig:
        return self.live  # validated as a LiveConfig already

    def schedule_config(self) -> ScheduleConfig:
        return self.schedule  # validated as a ScheduleConfig already


class _NoEnvironment(Settings):
    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def service_config(settings: Settings) -> ServiceConfig:
    """The service's own configuration (keys read from their sources now)."""
    accounts = tuple(AccountConfig(a.name, settings.exchange_settings(a), tuple(a.symbols)) for a in settings.accounts)
    api = ApiBinding(settings.api_token(), settings.api.host, settings.api.port) if settings.api.enabled else None
    return ServiceConfig(accounts=accounts, database_url=settings.database_url, records_dir=settings.records.dir,
                         live=settings.live_config(), schedule=settings.schedule_config(),
                         reconcile=settings.reconcile,
                         shutdown_drain_s=settings.shutdown_drain_s, storage_timeout_s=settings.storage_timeout_s,
                         records_retention_days=settings.records.retention_days, api=api,
                         trailing_activation_pct=settings.trailing.activation_pct,
                         trailing_callback_pct=settings.trailing.callback_rate,
                         cluster=settings.cluster.config() if settings.cluster is not None else None)


def load(path: Path | None, *, check_secrets: bool = True) -> Settings:
    """Read the TOML file (optional: environment variables alone may do) and the environment; check it all,
    including that every account's key and secret (and the API token) can be read. Raises ConfigError with
    one line naming the key."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"configuration file {path} is not valid TOML: {e}") from None
    try:
        settings = Settings(**data)
    except ValidationError as e:
        raise ConfigError(_first_problem(e)) from None
    except SettingsError as e:  # e.g. a nested value in the environment that is not valid JSON
        raise ConfigError(f"environment: {str(e).split(chr(10))[0]}") from None
    named = {name.upper() for a in settings.accounts for name in (a.api_key_env, a.secret_env) if name}
    _refuse_unknown_environment(Settings, named | {settings.api.token_env.upper()})
    if check_secrets:
        venue_accounts: dict[tuple[Any, ...], int] = {}
        for index, account in enumerate(settings.accounts):
            exchange = settings.exchange_settings(account)  # keys readable now rather than half-way through the start
            # One venue account configured twice: each would take the other's positions for untracked ones (and,
            # with `adopt`, both placed a stop on one position; review, seventh session).
            venue = (account.exchange, account.sandbox, tuple(sorted(account.urls.items())), exchange.api_key.reveal())
            if venue in venue_accounts:
                first = venue_accounts[venue]
                raise ConfigError(f"accounts.{index} ({account.name}): the same API key on the same exchange as "
                                  f"accounts.{first} ({settings.accounts[first].name}); configure each venue account "
                                  "once")
            venue_accounts[venue] = index
        if settings.api.enabled:
            settings.api_token()
    return settings


def _refuse_unknown_environment(settings_cls: type[Settings], named: set[str]) -> None:
    """A LIFECYCLE_* variable that is no setting is a typo (LIFECYCLE_SCHEDULE_SYNC_INTERVAL_S with one
    underscore would otherwise be ignored silently). Named, never its value. Variables the configuration
    names as holding a key, a secret or the token are not settings and are fine. Case-insensitive, as
    pydantic-settings reads them."""
    fields = {name.upper() for name in settings_cls.model_fields}
    for original in sorted(os.environ):
        name = original.upper()
        if not name.startswith("LIFECYCLE_") or name.startswith(_OTHER_ENV) or name in named:
            continue
        top = name.removeprefix("LIFECYCLE_").split("__", 1)[0]
        if top not in fields:
            close = [f for f in sorted(fields) if f.replace("_", "") in top.replace("_", "")]
            hint = f" (did you mean LIFECYCLE_{close[0]}__...?)" if close and close[0] != top else ""
            raise ConfigError(f"environment: {original} is not a setting{hint}")


def _first_problem(error: ValidationError) -> str:
    problems = error.errors()
    first = problems[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "unexpected_keyword_argument":  # an unknown key in a section that is a dataclass ([live])
        message = "Extra inputs are not permitted"  # as in every other section
    given = first.get("input")
    # Only numbers are echoed: a string may be a secret pasted into the wrong key or variable.
    shown = f" (got {given!r})" if isinstance(given, (int, float)) and not isinstance(given, bool) else ""
    if first["type"] == "string_pattern_mismatch" and key.endswith("_env"):
        message = "must be the NAME of an environment variable (upper case letters, digits, underscores)"
    more = f"; and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
    return f"{key}: {message}{shown}{more}"


def _read_secret(what: str, env: str | None, file: Path | None, environ: dict[str, str]) -> str:
    """The secret `what` (a key, a secret, the API token) from its file, else from the variable `env`.

    A file that group or others may read is refused, as ssh refuses such a private key: ConfigError
    naming the key (`accounts.0.secret_file`, `api.token_file`), the file and `chmod 600 FILE` (0400 is
    fine too; the owner is not checked: a service account reading a file root owns is a normal setup)."""
    if file is not None:
        try:
            value = _read_private_file(f"{what}_file", Path(file)).strip()
        except OSError as e:
            raise ConfigError(f"{what}: cannot read the file {file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{what}: the file {file} is not UTF-8 text") from None
        if not value:
            raise ConfigError(f"{what}: the file {file} is empty")
        return value
    if not env:
        raise ConfigError(f"{what}: no source given")
    if env not in environ:
        raise ConfigError(f"{what}: the environment variable {env} is not set")
    value = environ[env].strip()
    if not value:  # `export KEY=` with the value forgotten, or a secrets file line without one
        raise ConfigError(f"{what}: the environment variable {env} is set but empty")
    return value


def _read_private_file(key: str, path: Path) -> str:
    """The file's text, checked on the descriptor it is read from (no window for a swap between the check and
    the read): refused unless only its owner may read it."""
    import stat

    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, os.strerror(21), str(path))
        if os.name == "posix" and mode & 0o077:
            raise ConfigError(f"{key}: {path} is open to group or others (mode {mode & 0o7777:04o}); "
                              f"chmod 600 {path}")
        return f.read().decode("utf-8")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
