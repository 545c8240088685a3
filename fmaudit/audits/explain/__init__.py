"""Explainability audits."""
