"""Membership-inference algorithms (the `privacy.membership` module in fmaudit/audits/privacy/ calls them).

One idea per module:

- `signals`: per-example signals from model outputs (numpy): classifier loss / confidence / entropy /
  logit-scaled confidence, causal-LM sequence loss, zlib ratio, Min-K% and Min-K%++;
- `outputs`: reading those outputs, and membership-independent features, from a target's model (torch);
- `sets`: the member / non-member examples an audit attacks;
- `reference_models`: reference models on complementary random halves of the population (halves, their
  overlap with the target's split, training one reference model);
- `reference_attacks`: LiRA and RMIA from reference-model signals;
- `quantile`: the quantile-regression attack (Bertran et al. 2023);
- `attacks`: the attack registry (name -> scorer and what it needs);
- `stats`: ROC, AUC, TPR at low FPR, bootstrap intervals;
- `blind`: the model-free (blind) baseline;
- `headline`: the calibrated headline (attack chosen on one half, measured on the other, with a null).

Convention everywhere: the positive class is *member*, and a higher score means "more likely a member".
"""
