"""Policy: the rules that decide, per recipient, a channel or an exclusion with a reason code.

One module per rule family; `engine.decide` applies them in order, vectorised in polars.
"""

from cdp_activation.policy.engine import Decisions, decide

__all__ = ["Decisions", "decide"]
