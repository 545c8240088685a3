"""One registry of audit modules: lazy built-ins plus third-party plugins from entry points.

Built-ins are listed by import path and imported only when asked for, so `fmaudit --help`,
`fmaudit validate` and `fmaudit list` stay fast. Third-party packages join by declaring an entry point
in the group ``fmaudit.audits``::

    [project.entry-points."fmaudit.audits"]
    "mycompany.canary" = "mypkg.audits:CanaryAudit"
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

from fmaudit.hints import did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from fmaudit.audits.base import AuditModule

ENTRY_POINT_GROUP = "fmaudit.audits"

# name -> "module:Class". Every built-in audit is listed here and nowhere else.
BUILTIN_AUDITS: dict[str, str] = {
    "utility": "fmaudit.audits.utility:UtilityAudit",
    "privacy.canary_audit": "fmaudit.audits.privacy.canary:CanaryAudit",
    "robustness.text_attack": "fmaudit.audits.robustness.text_attack:TextAttackAudit",
    "robustness.image_attack": "fmaudit.audits.robustness.image_attack:ImageAttackAudit",
    "robustness.certify": "fmaudit.audits.robustness.certify:CertifyAudit",
    "privacy.membership": "fmaudit.audits.privacy.membership:MembershipAudit",
    "privacy.dp_finetune": "fmaudit.audits.privacy.dp_finetune:DPFinetuneAudit",
    "explain.attribution": "fmaudit.audits.explain.attribution:AttributionAudit",
}


class RegistryError(LookupError):
    """An unknown audit module name, two plugins declaring one name, or an entry that does not import."""


@dataclass
class _Entry:
    name: str
    ref: str  # "module:attr"
    origin: str  # "builtin" or the distribution that declared it
    loaded: type | None = None


@dataclass
class Registry:
    """A typed registry with lazy entries, collision errors and near-miss suggestions."""

    group: str = ENTRY_POINT_GROUP
    builtins: dict[str, str] = field(default_factory=lambda: dict(BUILTIN_AUDITS))
    _entries: dict[str, _Entry] | None = None

    # -- discovery -----------------------------------------------------------------------------------
    def _discover(self) -> dict[str, _Entry]:
        if self._entries is not None:
            return self._entries
        entries = {n: _Entry(n, ref, "builtin") for n, ref in self.builtins.items()}
        for ep in metadata.entry_points(group=self.group):
            dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
            if ep.name in entries:
                prev = entries[ep.name]
                if prev.ref == ep.value:  # the same package seen twice on sys.path
                    continue
                raise RegistryError(
                    f"audit module name {ep.name!r} is declared twice: by {prev.origin} ({prev.ref}) and by "
                    f"{dist} ({ep.value}); uninstall one of them or rename its entry point"
                )
            entries[ep.name] = _Entry(ep.name, ep.value, dist)
        self._entries = entries
        return entries

    def refresh(self) -> None:
        """Forget what was discovered (after installing a plugin in the same process)."""
        self._entries = None

    def register(self, cls: type[AuditModule], name: str | None = None) -> type[AuditModule]:
        """Register a class directly (for notebooks and tests); the name must be new."""
        entries = self._discover()
        name = name or cls.name
        if name in entries:
            raise RegistryError(f"audit module name {name!r} is already registered by {entries[name].origin}")
        entries[name] = _Entry(name, f"{cls.__module__}:{cls.__qualname__}", "registered", loaded=cls)
        return cls

    def unregister(self, name: str) -> None:
        self._discover().pop(name, None)

    # -- lookup --------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._discover())

    def __contains__(self, name: str) -> bool:
        return name in self._discover()

    def origin(self, name: str) -> str:
        return self._discover()[name].origin

    def get(self, name: str) -> type[AuditModule]:
        entries = self._discover()
        if name not in entries:
            raise RegistryError(
                f"unknown audit module {name!r}{did_you_mean(name, entries, n=3)} "
                f"(`fmaudit list` shows the {len(entries)} available)"
            )
        entry = entries[name]
        if entry.loaded is None:
            mod_name, _, attr = entry.ref.partition(":")
            try:
                obj: Any = importlib.import_module(mod_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except Exception as exc:
                raise RegistryError(
                    f"audit module {name!r} ({entry.ref}, from {entry.origin}) failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            from fmaudit.audits.base import AuditModule

            if not (isinstance(obj, type) and issubclass(obj, AuditModule)):
                raise RegistryError(f"{entry.ref} (from {entry.origin}) is not an fmaudit AuditModule subclass")
            if getattr(obj, "name", None) != name:
                raise RegistryError(
                    f"{entry.ref} declares name {getattr(obj, 'name', None)!r} but is registered as {name!r}"
                )
            entry.loaded = obj
        return entry.loaded

    def all(self) -> dict[str, type[AuditModule]]:
        return {n: self.get(n) for n in self.names()}


registry = Registry()
