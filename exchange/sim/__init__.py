"""A Binance USDⓈ-M futures venue simulator on localhost, for the unmodified ccxt `binanceusdm` client."""
from exchange.sim.venue import SimError, Venue, VenueConfig

__all__ = ["SimError", "Venue", "VenueConfig"]
