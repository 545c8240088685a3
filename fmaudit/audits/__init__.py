"""Audit modules. Built-ins are registered in fmaudit.registry.BUILTIN_AUDITS."""

from fmaudit.audits.base import AuditContext, AuditModule, AuditParams, Outcome

__all__ = ["AuditContext", "AuditModule", "AuditParams", "Outcome"]
