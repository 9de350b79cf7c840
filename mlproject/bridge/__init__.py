"""The NT8 bridge: the deployed Production policy trading through NinjaTrader 8 (or the paper
trader), every bar an experience. ``nt8/PROTOCOL.md`` is the protocol.

- :mod:`~mlproject.bridge.protocol`: message encoding and validation.
- :mod:`~mlproject.bridge.deployed`: the model in the deploy directory, reloaded when it changes.
- :mod:`~mlproject.bridge.observations`: observations built bar by bar, equal to the env's.
- :mod:`~mlproject.bridge.session`: one account/instrument: book, risk guard, experiences.
- :mod:`~mlproject.bridge.server`: the asyncio TCP server, one :class:`~mlproject.bridge.server.Connection`
  record per client.
- :mod:`~mlproject.bridge.listening`: the address, TLS and shared secret it listens with, checked.
- :mod:`~mlproject.bridge.batching`: inference batched across the sessions' bars.
- :mod:`~mlproject.bridge.sink`: experiences written to the buffer in batches, off the event loop.
- :mod:`~mlproject.bridge.killswitch`: the kill file that makes every decision flat.
- :mod:`~mlproject.bridge.paper`: the paper trader, a client that fills like NT8's simulator.
"""
