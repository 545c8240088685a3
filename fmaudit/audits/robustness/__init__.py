"""Robustness audits: adversarial attacks on text and image models."""
