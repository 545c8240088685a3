"""Explainability algorithms: the feature-space interface (`space.py`) with its text, image and causal-LM
implementations (`text.py`, `image.py`, `lm.py`), and the explanation-quality metrics written once over it
(`curves.py`, `faithfulness.py`, `road.py`, `randomization.py` with `cascade.py` and `similarity.py`).
Audit modules (`fmaudit/audits/explain/`) call them and write the report."""
