"""robustness.certify: randomized-smoothing certificates (Cohen et al. 2019) checked against scipy and closed
forms, against models whose answer is known (a constant classifier, a linear one that flips at a known L2
distance), and against the expectation-over-noise PGD on the smoothed classifier (certified <= empirical)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fmaudit.audits.base import AuditContext
from fmaudit.audits.robustness.certify import CertifyAudit
from fmaudit.data import Dataset, load_digits
from fmaudit.robustness import smoothing as sm
from fmaudit.testing import audit_context

SMALL = {"n0": 32, "n": 256, "predict_n": 128, "alpha": 0.001, "attack_steps": 10, "attack_noise_samples": 8}


def _ctx(tmp_path, data, *, seed=0) -> AuditContext:
    return audit_context(tmp_path, data=data, seed=seed, unit_id="0:robustness.certify@t")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def eval_set(digits) -> Dataset:
    return digits.subset(np.arange(1000, 1032))


def _wrap(inner, name="m", num_classes=10):
    from fmaudit.targets.vision import ImageClassifier, PixelClassifier

    return ImageClassifier(name=name, model=PixelClassifier(inner), source="test", num_classes=num_classes)


# ---------------------------------------------------------------------------------------------------
# The certificate math


@pytest.mark.parametrize(
    "k,n,alpha",
    [(1, 10, 0.05), (90, 100, 0.001), (256, 256, 0.001), (9_990, 10_000, 0.001), (500, 1000, 0.01), (7, 32, 0.2)],
)
def test_pa_lower_is_the_one_sided_clopper_pearson_bound(k, n, alpha):
    from scipy.stats import beta, binomtest

    lo = sm.pa_lower_bound(k, n, alpha)
    assert lo == pytest.approx(float(beta.ppf(alpha, k, n - k + 1)), rel=1e-9, abs=1e-12)
    # the same number as scipy's exact one-sided interval at level 1 - alpha
    ref = binomtest(k, n, alternative="greater").proportion_ci(confidence_level=1 - alpha, method="exact").low
    assert lo == pytest.approx(ref, rel=1e-7, abs=1e-12)
    assert lo < k / n


def test_pa_lower_edges():
    assert sm.pa_lower_bound(0, 100, 0.001) == 0.0
    assert sm.pa_lower_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    for bad in [(5, 0, 0.1), (11, 10, 0.1), (-1, 10, 0.1), (5, 10, 0.0), (5, 10, 1.0)]:
        with pytest.raises(ValueError):
            sm.pa_lower_bound(*bad)


def test_radius_is_sigma_times_probit():
    from scipy.stats import norm

    assert sm.certified_radius(float(norm.cdf(1.0)), 0.25) == pytest.approx(0.25, rel=1e-9)
    assert sm.certified_radius(float(norm.cdf(2.0)), 0.5) == pytest.approx(1.0, rel=1e-9)
    assert sm.certified_radius(0.99, 0.12) == pytest.approx(0.12 * norm.ppf(0.99), rel=1e-12)
    assert sm.certified_radius(0.5, 1.0) is None  # abstain at pA_lower <= 1/2
    assert sm.certified_radius(0.3, 1.0) is None
    assert sm.certified_radius(0.5000001, 1.0) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        sm.certified_radius(0.9, 0.0)


def test_certify_from_counts():
    from scipy.stats import beta, norm

    # selection picks class 2; the estimate counts class 2 in 950 of 1000 further copies
    c, r, pa = sm.certify_from_counts([1, 3, 96, 0], [20, 30, 950, 0], sigma=0.5, alpha=0.001)
    want = float(beta.ppf(0.001, 950, 51))
    assert c == 2 and pa == pytest.approx(want) and r == pytest.approx(0.5 * norm.ppf(want))
    # the bound is on the class the SELECTION chose, not the estimate's majority: here it abstains
    c, r, pa = sm.certify_from_counts([60, 40], [300, 700], sigma=0.5, alpha=0.001)
    assert c == sm.ABSTAIN and r is None and pa < 0.5
    # a near coin flip abstains
    c, r, _ = sm.certify_from_counts([10, 9], [520, 480], sigma=1.0, alpha=0.001)
    assert c == sm.ABSTAIN and r is None
    with pytest.raises(ValueError):
        sm.certify_from_counts([1, 2, 3], [1, 2], 1.0, 0.01)


def test_predict_from_counts_is_cohens_binomial_test():
    from scipy.stats import binomtest

    c, pv = sm.predict_from_counts([60, 40, 0], alpha=0.05)
    assert pv == pytest.approx(binomtest(60, 100, 0.5).pvalue) and pv > 0.05 and c == sm.ABSTAIN
    c, pv = sm.predict_from_counts([3, 30, 70], alpha=0.05)
    assert pv == pytest.approx(binomtest(70, 100, 0.5).pvalue) and c == 2
    # only the top two counts enter the test
    assert sm.predict_from_counts([45, 40, 15], alpha=0.05)[0] == sm.ABSTAIN
    assert sm.predict_from_counts([0, 0], alpha=0.05)[0] == sm.ABSTAIN


def test_certified_accuracy_and_allowance():
    pred = [0, 1, sm.ABSTAIN, 2, 1]
    radii = [0.5, 0.2, None, 1.0, 0.9]
    labels = [0, 1, 2, 1, 1]
    assert sm.certified_accuracy(pred, radii, labels, 0.0).tolist() == [True, True, False, False, True]
    assert sm.certified_accuracy(pred, radii, labels, 0.5).tolist() == [True, False, False, False, True]
    assert sm.certified_accuracy(pred, radii, labels, 0.95).tolist() == [False] * 5
    assert sm.failure_allowance(0, 0.001) == 1
    assert sm.failure_allowance(50, 0.002) == 2  # P(Binomial(50, .002) >= 2) ~ 0.4% > 0.1%
    assert sm.failure_allowance(1000, 0.1) > 100


def test_params():
    p = CertifyAudit.Params(radii=[0.5, 0.25, 0.5])
    assert p.radii == [0.0, 0.25, 0.5]  # sorted, unique, 0 always there
    for bad in [{"radii": [-0.1]}, {"radii": []}, {"sigma": 0}, {"alpha": 0.5}, {"n0": 0}, {"nope": 1}]:
        with pytest.raises(ValidationError):
            CertifyAudit.Params.model_validate(bad)
    from scipy.stats import norm

    p = CertifyAudit.Params(sigma=0.5, n=1000, alpha=0.01)
    assert p.max_radius == pytest.approx(0.5 * norm.ppf(0.01 ** (1 / 1000)))


# ---------------------------------------------------------------------------------------------------
# check()


def test_check_refuses_non_image_targets(tiny_bert_dir, eval_set):
    from fmaudit.targets import load_target

    text = load_target(model=str(tiny_bert_dir), task="text-classification", name="bert")
    problems = CertifyAudit().check(text, eval_set)
    assert len(problems) == 1 and "certifies image classifiers" in problems[0] and "text-classification" in problems[0]


def test_check_refuses_bad_data(cnn, eval_set):
    m = CertifyAudit()
    assert m.check(cnn, eval_set) == []
    scaled = Dataset("raw", "test", "image", list(eval_set.ids), eval_set.labels, images=eval_set.images * 16)
    assert any("outside [0, 1]" in q for q in m.check(cnn, scaled))
    wide = Dataset("wide", "test", "image", list(eval_set.ids), eval_set.labels + 5, images=eval_set.images)
    assert any("labels up to 14" in q for q in m.check(cnn, wide))
    assert m.check(cnn, None) == ["no examples to certify"]


# ---------------------------------------------------------------------------------------------------
# Models whose certified radius is known


def test_constant_classifier_is_certified_at_every_radius(tmp_path, eval_set):
    """A constant classifier cannot be fooled: every example of its class is certified at the largest
    radius n and alpha allow, every attack fails, and examples of other classes are certified wrong."""
    import torch

    class Constant(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 10, device=x.device) + 0.0 * x.flatten(1).sum(1, keepdim=True)
            out[:, 3] = 5.0
            return out

    target = _wrap(Constant())
    data = load_digits()
    data = data.subset(np.flatnonzero(data.labels == 3)[:12])
    params = {**SMALL, "radii": [0, 0.1, 0.25, 0.45], "sigma": 0.25}
    m = CertifyAudit(params)
    out = m.run(target, _ctx(tmp_path, data))
    max_r = m.params.max_radius
    assert 0.45 < max_r < 0.5  # n = 256, alpha = 0.001, sigma 0.25: 0.483
    for r in params["radii"]:
        assert out.metrics[f"certified_accuracy@{r:g}"].value == 1.0
        if r > 0:
            assert out.metrics[f"empirical_robust_accuracy@{r:g}"].value == 1.0
    assert all(ev["radius"] == pytest.approx(max_r) and ev["certified_class"] == 3 for ev in out.evidence)
    assert out.metrics["abstention_rate"].value == 0.0 and out.metrics["num_invariant_violations"].value == 0
    # other classes: certified, but as class 3, so never certified correct
    other = CertifyAudit({**SMALL, "radii": [0, 0.1], "attack": False}).run(target, _ctx(tmp_path, eval_set))
    frac3 = float((eval_set.labels == 3).mean())
    assert other.metrics["certified_accuracy@0"].value == pytest.approx(frac3)
    # without the attack there is no upper bound to compare with: no empirical metrics, no invariant verdict
    assert other.metrics["num_invariant_violations"].value is None and "invariant" not in other.tables
    assert not [k for k in other.metrics if k.startswith("empirical_robust_accuracy")]
    assert set(other.curves) == {"certified_accuracy"}


def _linear_problem(distances):
    """2 classes on 1x4x4 images: score w.x - w.0.5 with w a unit vector (+-1/4 entries summing to 0), so an
    image 0.5 + s*w sits at signed L2 distance s from the boundary, and the whole segment to it lies in
    [0, 1] (|s| <= 2)."""
    import torch

    w = torch.tensor([1.0, -1.0] * 8).view(1, 1, 4, 4) / 4.0
    signs = np.where(np.arange(len(distances)) % 2 == 0, 1.0, -1.0)
    s = np.asarray(distances) * signs
    images = (0.5 + torch.as_tensor(s, dtype=torch.float32).view(-1, 1, 1, 1) * w).numpy()
    labels = (s > 0).astype(np.int64)

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w.clone())

        def forward(self, x):
            z = 20.0 * ((x - 0.5) * self.w).flatten(1).sum(1)
            return torch.stack([-z, z], dim=1)

    ids = [f"lin:{i}" for i in range(len(s))]
    return _wrap(Linear(), num_classes=2), Dataset("lin", "test", "image", ids, labels, images=images)


def test_linear_model_radius_never_exceeds_the_flip_distance(tmp_path):
    """For a linear classifier the smoothed classifier flips exactly at the hyperplane, so the certificate
    is tight: R <= d always (up to the alpha failure), and close to d when n is large enough. The PGD on the
    smoothed classifier finds the flip: examples farther than r from the boundary survive, nearer ones fall."""
    distances = [0.03, 0.08, 0.12, 0.2, 0.3, 0.35, 0.45, 0.55, 0.7, 0.9, 1.2, 1.6]
    target, data = _linear_problem(distances)
    sigma = 0.25
    radii = [0, 0.1, 0.25, 0.5, 1.0]
    m = CertifyAudit(
        {
            "n0": 64,
            "n": 4000,
            "predict_n": 1000,
            "alpha": 0.001,
            "sigma": sigma,
            "radii": radii,
            "attack_steps": 10,
            "attack_noise_samples": 16,
            "num_examples": 100,
            "batch_size": 4000,
        }
    )
    out = m.run(target, _ctx(tmp_path, data))
    max_r = m.params.max_radius
    by_id = {ev["id"]: ev for ev in out.evidence}
    for i, d in enumerate(distances):
        ev = by_id[f"lin:{i}"]
        assert ev["certified_class"] in (None, int(data.labels[i]))  # never certified wrong
        r = ev["radius"]
        if r is not None:
            assert r <= d + 0.02 * sigma, (d, r)  # never beyond the flip distance
        if 0.1 <= d <= 0.8 * max_r:
            assert r is not None and r >= d - 0.1, (d, r)  # and near it (linear: the certificate is tight)
    # the attack: an example at distance d survives radius r when r < d - sigma/2 and falls when r > d + sigma/2
    rows = {row["radius"]: row for row in out.tables["invariant"]}
    for r in radii[1:]:
        surv = [d > r + sigma / 2 for d in distances]
        fall = [d < r - sigma / 2 for d in distances]
        acc = out.metrics[f"empirical_robust_accuracy@{r:g}"].value
        assert acc >= sum(surv) / len(distances) and acc <= 1 - sum(fall) / len(distances), (r, acc)
        assert rows[r]["holds"] and rows[r]["contradictions"] == 0
    # the certified curve sits under the empirical one, which sits under the true curve (fraction with d >= r)
    for r in radii:
        cert = out.metrics[f"certified_accuracy@{r:g}"].value
        emp = (
            out.metrics[f"empirical_robust_accuracy@{r:g}"].value
            if r > 0
            else out.metrics["smoothed_clean_accuracy"].value
        )
        assert cert <= emp + 1 / len(distances)
        assert cert <= float(np.mean([d >= r for d in distances]))


# ---------------------------------------------------------------------------------------------------
# The digits CNN: the invariant, the report, determinism, and a check that can fire


def test_invariant_on_digits_cnn(cnn, eval_set, tmp_path):
    radii = [0, 0.1, 0.25, 0.5, 1.0]
    m = CertifyAudit({**SMALL, "radii": radii, "sigma": 0.25})
    out = m.run(cnn, _ctx(tmp_path, eval_set))
    n = len(eval_set)
    assert out.metrics["num_examples"].value == n
    assert out.metrics["num_invariant_violations"].value == 0
    assert not [f for f in out.findings if f.severity == "high"], [f.title for f in out.findings]
    rows = {row["radius"]: row for row in out.tables["invariant"]}
    for r in radii:
        cert = out.metrics[f"certified_accuracy@{r:g}"]
        emp_value = (
            out.metrics[f"empirical_robust_accuracy@{r:g}"].value
            if r > 0
            else out.metrics["smoothed_clean_accuracy"].value
        )
        assert cert.value <= emp_value + rows[r]["allowance"] / n, (r, cert.value, emp_value)
        assert cert.ci_low <= cert.value <= cert.ci_high
    # the smoothed classifier is useful at sigma 0.25, and the attack works: accuracy falls with the radius
    assert out.metrics["smoothed_clean_accuracy"].value >= 0.6
    assert out.metrics["certified_accuracy@0.1"].value >= 0.5
    emp = [out.metrics[f"empirical_robust_accuracy@{r:g}"].value for r in radii[1:]]
    assert emp == sorted(emp, reverse=True) and emp[-1] <= 0.1
    assert out.metrics["certified_accuracy@0.5"].value == 0.0  # beyond max radius 0.483 at n = 256
    assert any(f.title == "Radii beyond what n can certify" for f in out.findings)
    # one curve pair with a shared x axis: certification (lower bound) and the attack (upper bound)
    c, e = out.curves["certified_accuracy"], out.curves["empirical_robust_accuracy"]
    assert c.x == e.x == radii and c.x_label == e.x_label
    assert all(a <= b + rows[r]["allowance"] / n for a, b, r in zip(c.y, e.y, radii))
    # same seed: the same numbers; another seed: other noise
    again = m.run(cnn, _ctx(tmp_path, eval_set))
    assert [ev["radius"] for ev in again.evidence] == [ev["radius"] for ev in out.evidence]
    other = m.run(cnn, _ctx(tmp_path, eval_set, seed=1))
    assert [ev["top_count"] for ev in other.evidence] != [ev["top_count"] for ev in out.evidence]


def test_invariant_check_fires_on_an_inflated_certificate(cnn, eval_set, tmp_path, monkeypatch):
    """A wrong certificate (radii inflated 5x) claims robustness the attack disproves: the module says so."""
    real = sm.certified_radius
    monkeypatch.setattr(
        sm, "certified_radius", lambda pa, sigma: None if real(pa, sigma) is None else 5 * real(pa, sigma)
    )
    out = CertifyAudit({**SMALL, "radii": [0, 0.5, 1.0], "attack_steps": 5}).run(cnn, _ctx(tmp_path, eval_set))
    assert out.metrics["num_invariant_violations"].value >= 1
    titles = [f.title for f in out.findings if f.severity == "high"]
    assert any(t.startswith("Certified accuracy above the empirical robust accuracy") for t in titles), titles
    bad = [row for row in out.tables["invariant"] if not row["holds"]]
    assert bad and all(row["contradictions"] > row["allowance"] for row in bad)


# ---------------------------------------------------------------------------------------------------
# Through a recipe: recipes/certify_digits.yaml (digits CNN and ViT), cut down


def test_recipe_certify_digits(tmp_path):
    import yaml

    from fmaudit.runner import run_recipe

    path = Path(__file__).resolve().parents[3] / "recipes" / "certify_digits.yaml"
    recipe = yaml.safe_load(path.read_text())
    assert {t["model"] for t in recipe["targets"].values()} == {"bundled:digits-cnn", "bundled:digits-vit"}
    recipe["targets"]["cnn"]["finetune"]["epochs"] = 4
    recipe["targets"]["vit"]["finetune"]["epochs"] = 4
    audit = recipe["audits"][0]
    assert audit["use"] == "robustness.certify"
    audit["params"].update(
        {"n0": 32, "n": 256, "predict_n": 128, "num_examples": 16, "attack_steps": 5, "radii": [0, 0.1, 0.25, 0.5]}
    )
    audit.pop("fail_if", None)
    report = run_recipe(recipe, output_dir=tmp_path / "runs", base_dir=path.parent)
    assert report.status == "complete"
    for name in ("cnn", "vit"):
        r = report.result("robustness.certify", name)
        assert r.status == "ok", r.error
        assert r.metrics["num_examples"].value == 16
        assert r.metrics["num_invariant_violations"].value == 0
        assert set(r.curves) == {"certified_accuracy", "empirical_robust_accuracy"}
        assert r.tables["evaluated_on"]["subset"] == "nonmembers"
        assert r.tables["settings"]["n"] == 256
        cert = [r.metrics[f"certified_accuracy@{x:g}"].value for x in (0, 0.1, 0.25, 0.5)]
        assert cert == sorted(cert, reverse=True)
    assert report.result("robustness.certify", "cnn").metrics["certified_accuracy@0.1"].value >= 0.5


def test_dashboard_overlays_certified_and_attacked_accuracy(tmp_path):
    """The dashboard's robustness view draws the two bounds of one result on one plot, with its caption."""
    from dashboard.renderers.robustness import render_certify
    from dashboard.runs import RunEntry
    from dashboard.sinks import HtmlSink
    from fmaudit.report import AuditResult, Curve, Metric

    r = AuditResult.model_construct(
        unit_id="0:robustness.certify@cnn",
        module="robustness.certify",
        target="cnn",
        status="ok",
        metrics={"smoothed_clean_accuracy": Metric(value=0.86), "num_invariant_violations": Metric(value=0.0)},
        curves={
            "certified_accuracy": Curve(
                x=[0, 0.25, 0.5], y=[0.86, 0.73, 0.34], x_label="L2 radius", y_label="accuracy"
            ),
            "empirical_robust_accuracy": Curve(
                x=[0, 0.25, 0.5], y=[0.86, 0.78, 0.56], x_label="L2 radius", y_label="accuracy"
            ),
        },
        findings=[],
        tables={},
        evidence=[],
    )
    entry = RunEntry(name="run", path=tmp_path, state="ok", report=None, run_id="run")
    sink = HtmlSink()
    render_certify(sink, entry, [r])
    html = sink.render()
    assert sink.figures == 1 and "certified_accuracy" in html and "empirical_robust_accuracy" in html
    assert "between the two curves" in html and "smoothed_clean_accuracy" in html
