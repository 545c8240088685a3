"""Old import path of the reference-model halves (new home: fmaudit.privacy.membership.reference_models), still
used by fmaudit/known_answers.py, tests/test_seeds.py and benchmarks/ray_speedup.py; to be removed once they
import the new name."""

from fmaudit.privacy.membership import reference_models as _reference_models

paired_halves = _reference_models.paired_halves
