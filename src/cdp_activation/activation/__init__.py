"""The activation in plain Python: its spec (defs.yaml), validation, the preview's
confirmation and cost, and a run's steps (audience, decisions, deliveries)."""
