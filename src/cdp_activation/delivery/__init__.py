"""Delivery: the engine that claims due sends from the ledger and sends them through the
connectors, over a shared HTTP transport, within each sender's rate."""
