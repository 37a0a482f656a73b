"""`lifecycle init`: a commented configuration to start from, for Binance's futures testnet or for the bundled
simulator (`python -m exchange.sim` with its defaults). Every key written says in a comment what it means;
docs/configuration.md has them all."""
from __future__ import annotations

from exchange.sim.server import DEFAULT_HOST, DEFAULT_REST_PORT, DEFAULT_WS_PORT, KEY_ENV, SECRET_ENV, ccxt_urls
from exchange.sim.venue import VenueConfig

SIM_KEY_ENV, SIM_SECRET_ENV = KEY_ENV, SECRET_ENV  # the simulator reads its account's key and secret from these
TESTNET_KEY_ENV, TESTNET_SECRET_ENV = "BINANCE_TESTNET_KEY", "BINANCE_TESTNET_SECRET"
TOKEN_ENV = "LIFECYCLE_API_TOKEN"

_HEAD = """\
# position-lifecycle configuration, written by `lifecycle init{flag}`.
# Every key is explained in docs/configuration.md. Keys and secrets are never written here: the account
# names the environment variables that hold them. Any key can be overridden from the environment:
# LIFECYCLE_<KEY>, nested with "__" (LIFECYCLE_API__PORT=8781). An unknown key is an error.
# The service finds this file as ./lifecycle.toml, or give it with `-c FILE` or LIFECYCLE_CONFIG=FILE.
{intro}
database_url = "sqlite:///lifecycle.sqlite"      # where positions and their journals live (a file here), or
                                                 # "postgresql://user@127.0.0.1:5432/lifecycle"
log_dir = "logs"                                 # lifecycle.log there, rotated daily
log_retention_days = 14                          # older log files are deleted
shutdown_drain_s = 10                            # on SIGTERM: how long closes in flight may take to finish
"""

_SIM_INTRO = f"""#
# For the bundled simulator. In one terminal:
#     export {SIM_KEY_ENV}=sim-key {SIM_SECRET_ENV}=sim-secret
#     python -m exchange.sim
# and in another (the same two variables, and the control API's token):
#     export {SIM_KEY_ENV}=sim-key {SIM_SECRET_ENV}=sim-secret {TOKEN_ENV}=any-long-random-string
#     lifecycle run
# then, in a third with the same {TOKEN_ENV}: lifecycle open BTCUSDT long 0.01 --stop-loss-pct 1;
# lifecycle status; lifecycle close POSITION_ID.
# The simulator takes its account's key and secret from {SIM_KEY_ENV} and {SIM_SECRET_ENV} (any values; it
# makes up a pair when they are not set, and prints it). Its prices follow a slow random walk.
"""

_TESTNET_INTRO = f"""#
# For Binance's USDⓈ-M futures testnet (https://testnet.binancefuture.com): create an API key there, then
#     export {TESTNET_KEY_ENV}=... {TESTNET_SECRET_ENV}=... {TOKEN_ENV}=any-long-random-string
#     lifecycle run
# For the real venue: sandbox = false, and a key of the real account (trading permission, one-way mode).
# To try things without any key: `lifecycle init --sim` (the bundled simulator) or `lifecycle demo`.
"""

_ACCOUNT = """
[[accounts]]                                     # one block per exchange account
name = "{name}"{name_pad}# the account's name in logs, records, metrics and the API
exchange = "binanceusdm"                         # a ccxt exchange id (Binance USDⓈ-M futures)
sandbox = {sandbox}{sandbox_pad}# true: the exchange's testnet (ccxt's sandbox URLs)
# the symbols this account trades and watches{symbols_note}:
symbols = {symbols}
api_key_env = "{key_env}"{key_pad}# the NAME of the variable holding the API key
                                                 # (or api_key_file = "/path/key", mode 600)
secret_env = "{secret_env}"{secret_pad}# the NAME of the variable holding the secret (or secret_file)
rate_limit = {rate_limit}{rate_pad}# pace requests by the venue's weights{rate_note}
"""

_SIM_URLS = """
[accounts.urls]                                  # ccxt URL overrides: where the simulator listens (the URLs
                                                 # `python -m exchange.sim` prints with its default ports):
                                                 # REST per API version, and the WebSocket root (ws.linear)
{urls}
"""

_TAIL = """
[api]                                            # the control API used by open, close and status
enabled = true                                   # false: no API (open and close need it; status works without)
host = "127.0.0.1"                               # loopback only (anything else needs allow_remote = true)
port = 8780                                      # `lifecycle open/close/status` and the live page (http://127.0.0.1:8780/)
token_env = "{token_env}"{token_pad}# the NAME of the variable holding the bearer token

[records]                                        # structured records of what happened, for analysis
dir = "records"                                  # JSON lines per event kind and day (closures, stop moves...)
retention_days = 30                              # older record files are deleted

[live]                                           # the live engine
default_stop_loss_pct = 1                        # initial stop distance (percent) when `open` gives none

# [trailing], [schedule], [reconcile] and more keys of [live]: see docs/configuration.md.
"""

_COLUMN = 49  # where the comments start


def _pad(text: str) -> str:
    """Spaces after `text` (the part of a line before its comment) up to the comment column."""
    return " " * max(1, _COLUMN - len(text))


def config_text(*, sim: bool) -> str:
    """The commented configuration `lifecycle init` writes (`sim`: for the bundled simulator)."""
    name = "sim" if sim else "testnet"
    key_env, secret_env = (SIM_KEY_ENV, SIM_SECRET_ENV) if sim else (TESTNET_KEY_ENV, TESTNET_SECRET_ENV)
    symbols = [s.symbol for s in VenueConfig().symbols] if sim else ["BTCUSDT", "ETHUSDT"]
    sandbox = "false" if sim else "true"
    rate_limit = "false" if sim else "true"
    text = _HEAD.format(flag=" --sim" if sim else "", intro=_SIM_INTRO if sim else _TESTNET_INTRO)
    text += _ACCOUNT.format(
        name=name, name_pad=_pad(f'name = "{name}"'), sandbox=sandbox, sandbox_pad=_pad(f"sandbox = {sandbox}"),
        symbols="[" + ", ".join(f'"{s}"' for s in symbols) + "]",
        symbols_note=" (all that the simulator serves)" if sim else "",
        key_env=key_env, key_pad=_pad(f'api_key_env = "{key_env}"'),
        secret_env=secret_env, secret_pad=_pad(f'secret_env = "{secret_env}"'),
        rate_limit=rate_limit, rate_pad=_pad(f"rate_limit = {rate_limit}"),
        rate_note=" (the simulator has none)" if sim else "; keep it on")
    if sim:
        urls = ccxt_urls(f"http://{DEFAULT_HOST}:{DEFAULT_REST_PORT}", f"ws://{DEFAULT_HOST}:{DEFAULT_WS_PORT}/ws")
        text += _SIM_URLS.format(urls="\n".join(f'"{k}" = "{v}"' for k, v in urls.items()))
    text += _TAIL.format(token_env=TOKEN_ENV, token_pad=_pad(f'token_env = "{TOKEN_ENV}"'))
    return text
