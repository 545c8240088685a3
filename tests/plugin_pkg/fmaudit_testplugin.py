"""Audit modules used by the tests: a third-party plugin (discovered through an entry point),
a module that always raises, and one that needs an image target."""

from __future__ import annotations

from pydantic import Field

from fmaudit.audits.base import AuditModule, AuditParams, Outcome


class LabelBalance(AuditModule):
    """A tiny but real plugin: the fraction of the audit data in the majority class."""

    name = "thirdparty.label_balance"
    category = "utility"
    description = "Majority-class fraction of the data (a test plugin)."
    requires = frozenset({"classifier"})
    metric_names = ("majority_fraction",)

    class Params(AuditParams):
        min_examples: int = Field(default=1, ge=1)

    def check(self, target, data):
        if data is None or len(data) < self.params.min_examples:
            return [f"needs at least {self.params.min_examples} examples"]
        return []

    def run(self, target, ctx):
        import numpy as np

        out = Outcome()
        counts = np.bincount(ctx.data.labels)
        out.metric("majority_fraction", counts.max() / counts.sum(), unit="fraction")
        return out


class AlwaysFails(AuditModule):
    name = "test.always_fails"
    category = "utility"
    description = "Raises on purpose (failure isolation tests)."

    class Params(AuditParams):
        message: str = "boom"

    def run(self, target, ctx):
        raise RuntimeError(self.params.message)


class NeedsImage(AuditModule):
    name = "test.needs_image"
    category = "robustness"
    description = "Needs an image target (capability tests)."
    requires = frozenset({"image"})

    def run(self, target, ctx):  # pragma: no cover - never reached on text targets
        return Outcome()


class ProduceCopy(AuditModule):
    """Produces an unchanged copy of its target (tests the `produces` plumbing)."""

    name = "test.produce_copy"
    category = "privacy"
    description = "Produces a copy of the target."
    produces_target = True

    def run(self, target, ctx):
        out = Outcome()
        out.produced = target.copy()
        out.metric("copied", 1.0)
        return out
