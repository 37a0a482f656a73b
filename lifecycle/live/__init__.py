"""The live engine, one exchange account at a time (see `lifecycle.live.engine`)."""
from lifecycle.live.config import LiveConfig, LiveStats, OpenCommand, Tally
from lifecycle.live.context import UNPROTECTED_GRACE_S, PositionRuntime
from lifecycle.live.engine import LiveEngine
from lifecycle.live.stops import TWO_STOPS_REFUSED, StopResult
from lifecycle.machines.states import FLATTENABLE, PROTECTED

__all__ = ["FLATTENABLE", "PROTECTED", "TWO_STOPS_REFUSED", "UNPROTECTED_GRACE_S", "LiveConfig", "LiveEngine",
           "LiveStats", "OpenCommand", "PositionRuntime", "StopResult", "Tally"]
