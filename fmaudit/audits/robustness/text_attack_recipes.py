"""Which TextAttack attacks `robustness.text_attack` can run, and what each needs offline.

Pure data and cheap checks (no torch, no TextAttack import), so recipe validation stays fast.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Attacks built by fmaudit (over TextAttack components) that need no download at all.
EMBEDDING_SWAP = "embedding-swap"
NATIVE_ATTACKS: dict[str, str] = {
    "deepwordbug": "DeepWordBug (Gao et al. 2018): character edits (swap, substitute, delete, insert) on the most "
    "important words, greedy word-importance search, Levenshtein distance <= 30.",
    "pruthi": "Pruthi et al. 2019: one typo-like character edit (swap, delete, insert, QWERTY neighbour) inside one "
    "word of 4+ letters, greedy search.",
    "input-reduction": "Input reduction (Feng et al. 2018): delete the least important words while the prediction "
    "stays the same (measures how little of the input the model needs; not a flip attack).",
    EMBEDDING_SWAP: "TextFooler-style word swap with synonyms from the target's own input embeddings (nearest whole-"
    "word vocabulary entries by cosine similarity, precomputed and cached), greedy word-importance "
    "search (delete ranking by default; unk, gradient or weighted-saliency), embedding cosine and "
    "modification-rate constraints, an antonym / sentiment-polarity / negation filter, and sentence "
    "similarity under the bundled MiniLM sentence encoder (cosine >= 0.8).",
}

# TextAttack recipe name -> class (textattack.attack_args.ATTACK_RECIPE_NAMES in 0.3.11).
TEXTATTACK_RECIPES: dict[str, str] = {
    "alzantot": "GeneticAlgorithmAlzantot2018",
    "bae": "BAEGarg2019",
    "bert-attack": "BERTAttackLi2020",
    "faster-alzantot": "FasterGeneticAlgorithmJia2019",
    "deepwordbug": "DeepWordBugGao2018",
    "hotflip": "HotFlipEbrahimi2017",
    "input-reduction": "InputReductionFeng2018",
    "kuleshov": "Kuleshov2017",
    "morpheus": "MorpheusTan2020",
    "seq2sick": "Seq2SickCheng2018BlackBox",
    "textbugger": "TextBuggerLi2018",
    "textfooler": "TextFoolerJin2019",
    "pwws": "PWWSRen2019",
    "iga": "IGAWang2019",
    "pruthi": "Pruthi2019",
    "pso": "PSOZang2020",
    "checklist": "CheckList2020",
    "clare": "CLARE2020",
    "a2t": "A2TYoo2021",
    "leap": "LEAP2023",
    "bad-characters": "BadCharacters2021",
}

# Recipes this module cannot run on a classifier whatever is installed.
UNSUPPORTED: dict[str, str] = {
    "seq2sick": "it attacks sequence-to-sequence models (translation / summarization), not classifiers",
    "bad-characters": "it is a targeted attack whose goal function must be chosen per use "
    "(goal_function_type); use deepwordbug or pruthi for character-level edits",
}

ALL_ATTACKS: tuple[str, ...] = tuple(sorted(set(NATIVE_ATTACKS) | set(TEXTATTACK_RECIPES)))

# Aliases people type.
ALIASES: dict[str, str] = {
    "input_reduction": "input-reduction",
    "embedding_swap": EMBEDDING_SWAP,
    "bert_attack": "bert-attack",
    "deep-word-bug": "deepwordbug",
}


@dataclass(frozen=True)
class Resource:
    key: str
    what: str
    available: Callable[[ResourceContext], bool]
    how: Callable[[ResourceContext], str]


@dataclass(frozen=True)
class ResourceContext:
    ta_cache: Path  # <fmaudit cache>/textattack
    nltk_dir: Path
    masked_lm: str | None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _ta_file(rel: str) -> Callable[[ResourceContext], bool]:
    return lambda rc: (rc.ta_cache / rel).exists()


def _hf_cached(name: str) -> bool:
    if Path(name).expanduser().is_dir():
        return (Path(name).expanduser() / "config.json").exists()
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def _nltk_has(rc: ResourceContext, *names: str) -> bool:
    dirs = [rc.nltk_dir]
    try:
        import nltk  # light; no TextAttack

        dirs += [Path(p) for p in nltk.data.path]
    except ImportError:  # pragma: no cover
        pass
    return all(any((d / "corpora" / n).exists() or (d / "corpora" / f"{n}.zip").exists() for d in dirs) for n in names)


def _flair_model(name: str) -> Callable[[ResourceContext], bool]:
    def ok(rc: ResourceContext) -> bool:
        import os

        root = Path(os.getenv("FLAIR_CACHE_ROOT", Path.home() / ".flair"))
        return any(root.glob(f"**/*{name}*")) if root.exists() else False

    return ok


def _s3_how(rel: str) -> Callable[[ResourceContext], str]:
    return lambda rc: (
        f"on a machine with internet, download https://textattack.s3.amazonaws.com/{rel}"
        f"{'' if rel.endswith('.pkl') else '.zip'}, and unzip / copy it to {rc.ta_cache / rel}"
    )


def _mlm_resource(default: str) -> Resource:
    return Resource(
        f"masked-lm:{default}",
        f"the masked language model {default!r} (Hugging Face hub)",
        lambda rc: (rc.masked_lm is not None and _hf_cached(rc.masked_lm)) or _hf_cached(default),
        lambda rc: (
            f"set params.masked_lm to a local folder with a Hugging Face masked LM (config.json, weights, "
            f"tokenizer; e.g. `{default}` saved with save_pretrained), or put {default!r} into the Hugging "
            f"Face cache" + (f" (params.masked_lm={rc.masked_lm!r} is not such a folder)" if rc.masked_lm else "")
        ),
    )


GLOVE = Resource(
    "counter-fitted-glove",
    "counter-fitted GloVe word embeddings (TextAttack's paragramcf)",
    _ta_file("word_embeddings/paragramcf/nn.npy"),
    _s3_how("word_embeddings/paragramcf"),
)
USE = Resource(
    "universal-sentence-encoder",
    "the Universal Sentence Encoder (TF-Hub; needs tensorflow and tensorflow_hub)",
    lambda rc: _has_module("tensorflow_hub") and _has_module("tensorflow"),
    lambda rc: (
        "`pip install tensorflow tensorflow_hub` and copy the extracted TF-Hub module "
        "google/universal-sentence-encoder/4 into the TF-Hub cache (TFHUB_CACHE_DIR)"
    ),
)
POS = Resource(
    "flair-pos-tagger",
    "flair's part-of-speech tagger (upos-fast / pos-fast)",
    _flair_model("pos-fast"),
    lambda rc: "copy flair's `upos-fast` model into $FLAIR_CACHE_ROOT/models (default ~/.flair/models)",
)
WORDNET = Resource(
    "nltk-wordnet",
    "the NLTK WordNet and omw-1.4 corpora",
    lambda rc: _nltk_has(rc, "wordnet", "omw-1.4"),
    lambda rc: (
        f"on a machine with internet run `python -m nltk.downloader -d DIR wordnet omw-1.4` "
        f"and copy DIR/corpora into {rc.nltk_dir / 'corpora'}"
    ),
)
HOWNET = Resource(
    "hownet",
    "the HowNet synonym candidates (TextAttack's word_candidates_sense.pkl)",
    _ta_file("transformations/hownet/word_candidates_sense.pkl"),
    _s3_how("transformations/hownet/word_candidates_sense.pkl"),
)
GOOG_LM = Resource(
    "google-1b-lm",
    "the Google 1-billion-words language model (TensorFlow)",
    lambda rc: (
        _has_module("tensorflow") and (rc.ta_cache / "constraints/semantics/language-models/alzantot-goog-lm").exists()
    ),
    _s3_how("constraints/semantics/language-models/alzantot-goog-lm"),
)
L2W = Resource(
    "learning-to-write-lm",
    "the learning-to-write language model",
    _ta_file("constraints/grammaticality/language-models/learning-to-write"),
    _s3_how("constraints/grammaticality/language-models/learning-to-write"),
)
GPT2 = Resource(
    "gpt2",
    "the GPT-2 language model (Hugging Face hub 'gpt2')",
    lambda rc: _hf_cached("gpt2"),
    lambda rc: "put 'gpt2' into the Hugging Face cache (HF_HOME) on this machine",
)
SBERT = Resource(
    "sbert-stsb-distilbert",
    "the sentence-transformers model 'stsb-distilbert-base'",
    lambda rc: _hf_cached("sentence-transformers/stsb-distilbert-base"),
    lambda rc: "put 'sentence-transformers/stsb-distilbert-base' into the Hugging Face cache",
)
NER = Resource(
    "flair-ner-tagger",
    "flair's named-entity tagger (ner)",
    _flair_model("ner"),
    lambda rc: "copy flair's `ner` model into $FLAIR_CACHE_ROOT/models (default ~/.flair/models)",
)

RECIPE_RESOURCES: dict[str, tuple[Resource, ...]] = {
    "textfooler": (GLOVE, POS, USE),
    "pwws": (WORDNET,),
    "leap": (WORDNET,),
    "bae": (_mlm_resource("bert-base-uncased"), POS, USE),
    "bert-attack": (_mlm_resource("bert-base-uncased"), USE),
    "clare": (_mlm_resource("distilroberta-base"), USE),
    "a2t": (GLOVE, POS, SBERT),
    "alzantot": (GLOVE, GOOG_LM),
    "faster-alzantot": (GLOVE, L2W),
    "iga": (GLOVE,),
    "kuleshov": (GLOVE, GPT2),
    "hotflip": (GLOVE, POS),
    "textbugger": (GLOVE, USE),
    "pso": (HOWNET,),
    "checklist": (NER,),
    "morpheus": (),
}

MASKED_LM_DEFAULTS: dict[str, str] = {
    "bae": "bert-base-uncased",
    "bert-attack": "bert-base-uncased",
    "clare": "distilroberta-base",
}


def canonical(name: str) -> str:
    n = name.strip().lower()
    return ALIASES.get(n, n)


def missing_resources(attack: str, rc: ResourceContext) -> list[str]:
    """One message per resource `attack` needs that is not available offline."""
    attack = canonical(attack)
    if attack in UNSUPPORTED:
        return [f"attack {attack!r} is not supported by robustness.text_attack: {UNSUPPORTED[attack]}"]
    out = []
    for res in RECIPE_RESOURCES.get(attack, ()):
        if not res.available(rc):
            out.append(
                f"attack {attack!r} needs {res.what}, which is not available offline here; to provide it: "
                f"{res.how(rc)}. Attacks that need no download: {', '.join(sorted(NATIVE_ATTACKS))}"
            )
    return out
