"""The event loop's cost of one mark-price frame, read past ccxt (the tap) against through ccxt's ticker handling.

Binance pushes `<symbol>@markPrice@1s` for every symbol an account trades, changed or not: 500 symbols are 500
frames a second, and in a cascade they share the event loop with the closes. Each frame here goes through the
adapter's real client (`_guarded` ccxt binanceusdm, markets loaded, nothing connected) the way ccxt's receive loop
hands it over (`handle_message` of the parsed JSON), then the stream's supervisor takes it (`_Fresh.take`, with the
sweep of ccxt's ticker table the old way needed). Printed: microseconds per frame, each way, best of `--repeat`.

Run: python -m bench.mark_frames [--symbols 500] [--rounds 20] [--repeat 5]
"""
from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import ccxt.pro as ccxtpro

from exchange.ccxt_adapter import CcxtExchange, ExchangeSettings, _Fresh, _guarded, _Tap


def _markets(symbols: int) -> list[dict[str, Any]]:
    return [{"id": f"S{i:03d}USDT", "symbol": f"S{i:03d}/USDT:USDT", "base": f"S{i:03d}", "quote": "USDT",
             "settle": "USDT", "type": "swap", "spot": False, "swap": True, "future": False, "contract": True,
             "linear": True, "inverse": False, "contractSize": 1, "active": True,
             "precision": {"amount": 0.001, "price": 0.1}, "limits": {}, "info": {}} for i in range(symbols)]


async def _per_frame(symbols: int, rounds: int, tapped: bool) -> float:
    adapter = CcxtExchange(ExchangeSettings(exchange_id="binanceusdm"))
    client = _guarded(ccxtpro.binanceusdm, adapter)({"options": {"fetchCurrencies": False}})
    client.set_markets(_markets(symbols))
    adapter.client = client
    ws = client.client("wss://fstream.example/stream")
    ids = [f"S{i:03d}USDT" for i in range(symbols)]
    tap = _Tap(frozenset(ids)) if tapped else None
    if tap is not None:
        adapter._taps = {"marks": [tap]}
    fresh = _Fresh("marks", adapter._mark, lambda m: (m.symbol, m.price, m.at), lambda m: (m.symbol, m.at),
                   lambda *_: None)
    unified = [f"S{i:03d}/USDT:USDT" for i in range(symbols)]
    frames = [[{"stream": f"{s.lower()}@markPrice@1s", "data": {
        "e": "markPriceUpdate", "E": 1_796_400_000_000 + r * 1000, "s": s, "p": f"{100 + r * 0.1:.8f}",
        "i": "100.00000000", "P": "100.00000000", "r": "0.00010000", "T": 1_796_403_600_000}} for s in ids]
        for r in range(rounds)]
    delivered = 0
    started = time.perf_counter()
    for batch in frames:
        for start in range(0, symbols, 50):  # the supervisor takes after every 50 frames (a loop turn's worth)
            for message in batch[start:start + 50]:
                client.handle_message(ws, message)
            if tap is not None:
                delivered += len(fresh.take((), (), ready=tap.take()))
            else:
                tickers = client.tickers
                delivered += len(fresh.take((), [[tickers[u] for u in unified if u in tickers]]))
    took = time.perf_counter() - started
    await client.close()
    assert delivered == symbols * rounds, f"{delivered} of {symbols * rounds} marks delivered"
    return took / (symbols * rounds) * 1e6


async def main(symbols: int, rounds: int, repeat: int) -> None:
    for tapped in (False, True):
        best = min([await _per_frame(symbols, rounds, tapped) for _ in range(repeat)])
        print(f"{'tapped (read past ccxt)' if tapped else 'through ccxt':<24} {symbols} symbols x {rounds} rounds: "
              f"{best:6.1f} us per frame (best of {repeat})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.symbols, args.rounds, args.repeat))
