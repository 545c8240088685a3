"""Robustness math behind `robustness.image_attack` and `robustness.certify` that the libraries get wrong or
leave out.

- `cw`: Carlini-Wagner L2 with the paper's margin loss (true class masked to -inf) and its binary search
  over c (torchattacks 3.3.0's CW stops pushing when every other logit is negative, issue #184).
- `autoattack`: the reference AutoAttack (fra31/auto-attack, as installed with torchattacks) built with the
  run's seed and the model's own device, its settings read back for the report; and torchattacks'
  10-iteration variant, labelled as such.
- `intervals`: Clopper-Pearson intervals for accuracies.
- `smoothing` / `smoothing_noise`: randomized-smoothing certificates from counts, and the counts and the
  expectation-over-noise PGD-L2 behind `robustness.certify`.
- `devices`: the device a model actually lives on (attacks are built after the model is there).

No torch import at module level.
"""
