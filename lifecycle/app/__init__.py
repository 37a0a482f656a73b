"""The application layer: the service that runs accounts, its control API, settings, command line and demo.

It wires the layers below (the domain core in `lifecycle.machines`/`guards`, the engine, the live engine in
`lifecycle.live`, reconciliation, `exchange`, `db`, `scheduler`); nothing below imports it.
"""
