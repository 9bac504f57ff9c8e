"""Dagster components of cdp-activation (registered for `dg` through pyproject's entry point)."""

from cdp_activation.components.activation import ActivationComponent

__all__ = ["ActivationComponent"]
