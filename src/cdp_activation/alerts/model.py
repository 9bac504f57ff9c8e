"""An alert: which activation and partition, what happened, the figures and a link to the run.

Built from counts, reason codes and the first line of an error the project already wrote
without secrets; every text is passed through `mask_phones_in` once more on the way out, so
no phone number leaves in an alert whatever an error message echoed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdp_activation.masking import mask_phones_in

RUN_FAILED = "run_failed"
RUN_BLOCKED = "run_blocked"
DEGRADED = "degraded"
FALLBACK_BACKLOG = "fallback_backlog"
SIGNATURE_REFUSALS = "signature_refusals"


@dataclass(frozen=True)
class Alert:
    kind: str
    title: str
    activation: str | None = None
    partition: str | None = None
    findings: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    link: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The generic webhook's body."""
        return {
            "source": "cdp-activation",
            "kind": self.kind,
            "title": mask_phones_in(self.title),
            "activation": self.activation,
            "partition": self.partition,
            "findings": [mask_phones_in(f) for f in self.findings],
            "figures": self.figures,
            "run_id": self.run_id,
            "link": self.link,
        }

    def subject(self) -> str:
        """`[cdp-activation] <title> (<partition>)`: the title names the activation."""
        where = f" ({self.partition})" if self.partition else ""
        return mask_phones_in(f"[cdp-activation] {self.title}{where}")

    def text(self) -> str:
        """Plain text for e-mail and Slack: the subject, each finding, the figures, the link."""
        lines = [self.subject(), *(f"- {mask_phones_in(f)}" for f in self.findings)]
        if self.figures:
            lines.append(
                "Figures: " + ", ".join(f"{k} {_figure(v)}" for k, v in self.figures.items())
            )
        if self.link:
            lines.append(f"Run: {self.link}")
        return "\n".join(lines)


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if value < 1 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def run_link(ui_url: str, run_id: str) -> str:
    return f"{ui_url.rstrip('/')}/runs/{run_id}"
