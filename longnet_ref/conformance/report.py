"""The conformance report: per section pass / fail / not applicable, and the minimal failures."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

STATUSES = ("pass", "fail", "n/a")


@dataclass
class Failure:
    """A section's minimal failing configuration (shrunk by Hypothesis) and what was wrong."""

    section: str
    config: dict
    max_error: float
    tolerance: str
    message: str

    @property
    def seed(self) -> int:
        """The seed of the inputs: ``numpy.random.default_rng(seed)`` draws ``q, k, v``."""
        return self.config["seed"]


@dataclass
class SectionResult:
    section: str
    title: str
    status: str
    examples: int  # configurations on which the section's probe ran
    note: str = ""


@dataclass
class Report:
    """``check``'s answer. ``.ok`` is True when no section fails."""

    results: list
    failures: list
    settings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def sections(self) -> dict:
        """Section (``"§1"`` ... ``"§8"``) -> ``"pass"``, ``"fail"`` or ``"n/a"``."""
        return {r.section: r.status for r in self.results}

    def failure(self, section: str) -> Failure | None:
        return next((f for f in self.failures if f.section == section), None)

    def to_json(self, **kwargs) -> str:
        def clean(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        failures = [{key: clean(value) for key, value in asdict(f).items()} for f in self.failures]
        return json.dumps({"ok": self.ok, "settings": self.settings, "sections": [asdict(r) for r in self.results], "failures": failures}, **kwargs)

    def __str__(self) -> str:
        lines = ["| section | property | status | examples | max error | tolerance |", "| --- | --- | --- | --- | --- | --- |"]
        for r in self.results:
            f = self.failure(r.section)
            error = "" if f is None or f.max_error is None or math.isnan(f.max_error) else f"{f.max_error:.3g}"
            lines.append(f"| {r.section} | {r.title} | {r.status} | {r.examples} | {error} | {f.tolerance if f else ''} |")
        for f in self.failures:
            lines.append(f"\n{f.section} minimal counterexample (inputs: numpy.random.default_rng({f.seed})):\n  {f.message}")
        notes = [f"{r.section}: {r.note}" for r in self.results if r.status == "n/a" and r.note]
        if notes:
            lines.append("\nnot applicable: " + "; ".join(notes))
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        lines.append(f"\n{'CONFORMANT' if self.ok else 'NOT CONFORMANT'} ({settings})")
        return "\n".join(lines)
