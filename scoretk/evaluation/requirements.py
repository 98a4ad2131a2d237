"""Pass/fail thresholds: `--require precision>=0.8`, `--require 'fid<=heldout*1.5'`.

Grammar: `[SPACE.]METRIC OP BOUND`, OP one of `>=` `<=`, BOUND a number or `heldout`, optionally
followed by `+X`, `-X` or `*X` (the same figure for held-out real data, shifted or scaled).
Without SPACE the metric is read in the first feature space evaluated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from scoretk.evaluation.sources import EvaluationError

METRICS = ("fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage",
           "is_mean", "is_std", "classes_present")
_PATTERN = re.compile(r"^\s*(?:(?P<space>[\w-]+)\.)?(?P<metric>\w+)\s*(?P<op>>=|<=)\s*"
                      r"(?:(?P<heldout>heldout)\s*(?:(?P<arith>[-+*])\s*(?P<x>[^\s]+))?"
                      r"|(?P<number>[^\s]+))\s*$")


@dataclass(frozen=True)
class Requirement:
    text: str
    space: str | None
    metric: str
    op: str
    number: float | None = None
    arith: str | None = None
    x: float = 0.0

    @property
    def relative(self) -> bool:
        return self.number is None

    def bound(self, heldout_value: float | None) -> float:
        if not self.relative:
            return self.number
        if self.arith == "*":
            return heldout_value * self.x
        return heldout_value + (-self.x if self.arith == "-" else self.x)

    def check(self, figures: dict[str, Any]) -> dict[str, Any]:
        """{'require', 'value', 'op', 'bound', 'pass', 'reason'?} for one feature space."""
        value = figures.get(self.metric)
        held = (figures.get("heldout") or {}).get(self.metric)
        out = {"require": self.text, "value": value, "op": self.op, "bound": None,
               "pass": False}
        if value is None or (self.relative and held is None):
            out["reason"] = f"{self.metric} is not available" + (
                "" if value is None else " for held-out data")
            return out
        out["bound"] = self.bound(held)
        out["pass"] = value >= out["bound"] if self.op == ">=" else value <= out["bound"]
        return out


def parse_requirement(text: str) -> Requirement:
    m = _PATTERN.match(text)
    if m is None:
        raise EvaluationError(f"--require {text!r}: expected [SPACE.]METRIC>=BOUND or <=BOUND, "
                              "BOUND a number or heldout[+X|-X|*X]")
    if m["metric"] not in METRICS:
        raise EvaluationError(f"--require {text!r}: unknown metric {m['metric']!r}; "
                              f"metrics: {', '.join(METRICS)}")
    try:
        number = None if m["heldout"] else float(m["number"])
        x = float(m["x"]) if m["x"] else 0.0
    except ValueError:
        raise EvaluationError(f"--require {text!r}: the bound is not a number") from None
    return Requirement(text, m["space"], m["metric"], m["op"], number, m["arith"], x)
