"""Misbehaviour the simulator can be told to show; every switch is off by default."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any

_TYPES: dict[Any, type] = {"int": int, "float": float, "bool": bool, "str": str,
                           int: int, float: float, bool: bool, str: str}


def _value(name: str, kind: type, value: Any) -> Any:
    """`value` as the field's declared type (not its default's: `0` of a float field is an int, and 0.35 s became
    0), without losing anything: 0.9 for a count, the text "false" for a switch, or a time that is negative or not
    a number (nan, inf), is refused (a ValueError naming the fault), not read as 0, True or nan."""
    if kind is bool:
        if type(value) is bool or (type(value) is int and value in (0, 1)):
            return bool(value)
    elif kind is int:
        if type(value) is int or (type(value) is float and value.is_integer()):
            return int(value)
        if type(value) is str:
            with contextlib.suppress(ValueError):
                return int(value)
    elif kind is float:  # (every float switch is a time: finite, not negative)
        number: float | None = None
        if type(value) in (int, float):
            number = float(value)
        elif type(value) is str:
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number) and number >= 0:
            return number
    elif kind is str and type(value) is str:
        return value
    raise ValueError(f"fault {name} takes a {kind.__name__}, got {value!r}")


@dataclass
class Faults:
    """Switches of the simulator's misbehaviour (`SimServer.set_faults`, `POST /_sim/faults`).

    Four silences of the user-data stream, each reproducible (tests/test_adapter_silence_and_checks.py):

    * expired key, no notice: `SimServer.expire_listen_keys()` (control `expire_listen_keys`): sockets stay
      open, nothing arrives on them, keepalive answers -1125, a new connection with the old key gets
      `listenKeyExpired` and is closed;
    * expired key with notice: `expire_listen_keys(notice=True)` (control `expire_listen_keys` with
      `{"notice": true}`): `listenKeyExpired` is pushed on every open connection first, which then stays
      open and silent;
    * wedged socket: `ws_silent`: connected, the listen key valid (keepalive answers), nothing delivered;
    * dropped, reconnects refused: `user_stream_down` and `SimServer.drop_streams()`: the sockets are cut
      and every new one is refused (503) until the fault is off.

    Not faults but account state (`SimServer.set_account`, `revoke_key`, control `account` / `revoke_key`):
    a revoked key (every keyed request answers -2015), `can_trade` false (shown by accountConfig and
    account v2 only: what Binance answers to an order then is not documented, so orders still go through),
    hedge mode (`dual_side_position`: positionSide/dual says so and orders without LONG/SHORT answer -4061).
    """

    rest_latency_ms: int = 0  # added to every REST answer
    stale_positions_s: float = 0.0  # positionRisk keeps answering the snapshot taken when this was set
    ws_silent: bool = False  # user-data connections stay open, events are swallowed, the key stays valid (a wedge)
    user_stream_down: bool = False  # user-data WebSocket connections are refused (503): the stream is down
    duplicate_events: bool = False  # every user-data event is sent twice
    reorder_events: bool = False  # user-data events are held and sent in pairs, the second first
    delay_fill_updates_s: float = 0.0  # fill updates (ORDER_TRADE_UPDATE, x=TRADE) are sent this much later
    http_5xx: int = 0  # the next N REST calls answer 503 (alternating HTML and JSON -1001 bodies)
    timeouts: int = 0  # the next N REST calls hang for timeout_s before answering 503
    timeout_s: float = 15.0
    rate_limit: int = 0  # the next N REST calls answer 429 -1003
    ip_ban: int = 0  # the next N REST calls answer 418 -1003
    reject_stops: int = 0  # the next N algo orders are rejected with reject_stops_code whatever the mark
    reject_stops_code: int = -2021  # -2021: would immediately trigger; e.g. -1111 for a plain rejection
    reject_orders: int = 0  # the next N regular orders are rejected with -2019 (margin is insufficient)
    lost_answers: int = 0  # the next N REST calls are carried out, but answer 504 (the answer got lost)
    lost_answers_on: str = ""  # only calls to this "METHOD /path" lose their answers (empty: any call)
    single_stop: bool = False  # a second working STOP_MARKET on a symbol is refused with -4045
    keep_stops_when_flat: bool = False  # reduce-only stops stay working on a flat symbol (else they expire)
    # Crash tests: when the REST call `signal_on` ("METHOD /path", e.g. "POST /fapi/v1/order") arrives for
    # the (signal_skip + 1)-th time, send signal `signal_num` to process `signal_pid`, once. "before": the
    # venue has not carried the call out (with SIGKILL it never does); "after": carried out, the answer
    # not yet sent.
    signal_on: str = ""
    signal_when: str = "after"
    signal_skip: int = 0
    signal_pid: int = 0
    signal_num: int = 9

    def update(self, changes: dict[str, Any]) -> None:
        known = {f.name: f.type for f in fields(self)}
        unknown = set(changes) - set(known)
        if unknown:
            raise ValueError(f"unknown fault(s): {sorted(unknown)}; known: {sorted(known)}")
        if "signal_when" in changes and changes["signal_when"] not in ("before", "after"):
            raise ValueError(f"signal_when must be 'before' or 'after', got {changes['signal_when']!r}")
        # All checked before any is set: a bad value switches nothing on.
        converted = {name: _value(name, _TYPES[known[name]], value) for name, value in changes.items()}
        for name, value in converted.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
