"""TextAttack glue for fmaudit text targets: a fast model wrapper, the embedding word-swap attack, and
attack construction. Importing this module imports TextAttack (through `import_textattack`, offline and
without changing the environment), so only import it inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmaudit.audits.robustness.textattack_env import NLTK_ENGLISH_STOPWORDS, import_textattack

textattack = import_textattack()

from textattack import Attack  # noqa: E402
from textattack.constraints import Constraint  # noqa: E402
from textattack.constraints.pre_transformation import MaxModificationRate, RepeatModification, StopwordModification  # noqa: E402
from textattack.constraints.semantics import WordEmbeddingDistance  # noqa: E402
from textattack.constraints.semantics.sentence_encoders import SentenceEncoder  # noqa: E402
from textattack.goal_functions import UntargetedClassification  # noqa: E402
from textattack.models.wrappers import ModelWrapper  # noqa: E402
from textattack.search_methods import BeamSearch, GreedySearch, GreedyWordSwapWIR  # noqa: E402
from textattack.shared import WordEmbedding  # noqa: E402
from textattack.shared.validators import transformation_consists_of_word_swaps  # noqa: E402
from textattack.transformations import WordSwapEmbedding  # noqa: E402

from fmaudit.audits.robustness.text_attack_recipes import EMBEDDING_SWAP, MASKED_LM_DEFAULTS, TEXTATTACK_RECIPES  # noqa: E402

NN_CACHE_VERSION = 1


class TargetModelWrapper(ModelWrapper):
    """TextAttack model wrapper over an fmaudit `TextClassifier`.

    Unlike TextAttack's `HuggingFaceModelWrapper` (which pads every input to the tokenizer's max length, 512
    for BERT), it tokenizes with the target's own settings (truncation at `target.max_length`), sorts each
    query by length and pads each sub-batch only to its longest member, and runs under `torch.inference_mode`.
    It returns float32 logits on the CPU, in the order asked.
    """

    def __init__(self, target: Any, batch_size: int = 64):
        self.target = target
        self.model = target.model  # TextAttack's validators look at the model's class
        self.tokenizer = target.tokenizer
        self.batch_size = int(batch_size)
        self.num_inputs = 0  # texts scored (TextAttack's goal function counts queries per example)
        self.num_calls = 0
        self.num_gradients = 0  # get_grad calls (gradient word-importance ranking)

    def __call__(self, text_input_list: Sequence[str], **kwargs: Any) -> torch.Tensor:
        texts = [t if isinstance(t, str) else " ".join(t) for t in text_input_list]
        self.num_calls += 1
        self.num_inputs += len(texts)
        if not texts:
            return torch.zeros((0, self.target.num_labels or 0))
        ids = self.target.tokenize(texts)
        order = np.argsort([len(s) for s in ids], kind="stable")
        out: torch.Tensor | None = None
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.target.to_device(self.target.pad([ids[int(i)] for i in idx]))
                logits = self.target.forward_logits(self.model, batch).float().cpu()
                if out is None:
                    out = torch.empty((len(texts), logits.shape[1]), dtype=torch.float32)
                out[torch.as_tensor(idx)] = logits
        assert out is not None
        return out

    def _tokenize(self, inputs: Sequence[str]) -> list[list[str]]:
        return [self.tokenizer.convert_ids_to_tokens(ids) for ids in self.target.tokenize(list(inputs))]

    def get_grad(self, text_input: str | Sequence[str]) -> dict[str, Any]:
        """Gradient of the loss (cross-entropy against the model's own prediction) with respect to the input
        embeddings of one text: {"ids": (1, L) token ids, "gradient": (L, d) array}, one row per token of the
        target's tokenization (special tokens included, as `_tokenize` returns them, so TextAttack's
        `align_with_model_tokens` indexes it correctly). Used by TextAttack's gradient word-importance ranking
        (`GreedyWordSwapWIR(wir_method="gradient")`) and gradient-based transformations.

        Unlike TextAttack's `HuggingFaceModelWrapper.get_grad` the model stays in eval mode (no dropout: the
        ranking is deterministic), inputs are not padded to max_length, and no parameter gradient is kept."""
        text = text_input if isinstance(text_input, str) else " ".join(text_input)
        emb_layer = self.target.embedding_layer()
        ids = self.target.tokenize([text])
        batch = self.target.to_device(self.target.pad(ids))
        captured: list[torch.Tensor] = []

        def leaf(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            # the embedding output as a leaf that requires grad: d loss / d embeddings, whatever the
            # parameters' requires_grad, and no parameter gradients are computed
            out = output.detach().requires_grad_(True)
            captured.append(out)
            return out

        was_training = self.model.training
        self.model.eval()
        hook = emb_layer.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                logits = self.target.forward_logits(self.model, batch)
                loss = torch.nn.functional.cross_entropy(logits.float(), logits.argmax(dim=1).detach())
                (grad,) = torch.autograd.grad(loss, captured[0])
        finally:
            hook.remove()
            self.model.train(was_training)
        self.num_gradients += 1
        return {"ids": batch["input_ids"].cpu(), "gradient": grad[0].detach().float().cpu().numpy()}


# ---------------------------------------------------------------------------------------------------
# Embedding word swap: synonyms from the target's own input embeddings


def whole_word_vocab(tokenizer: Any, min_length: int = 2) -> tuple[list[str], list[int]]:
    """Vocabulary entries that are whole alphabetic words (not sub-word continuations, special tokens or
    punctuation), lower-cased, first id kept when two entries lower-case to the same word."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    words: list[str] = []
    ids: list[int] = []
    seen: set[str] = set()
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tok in special or tok.startswith("##"):
            continue
        word = tok
        if word[:1] in ("Ġ", "▁"):  # GPT-2 / RoBERTa / SentencePiece word-start markers
            word = word[1:]
        elif getattr(tokenizer, "is_fast", False) and type(tokenizer).__name__.startswith(("GPT2", "Roberta")):
            continue  # byte-level BPE without the space marker: a continuation piece
        if len(word) < min_length or not word.isascii() or not word.isalpha():
            continue
        word = word.lower()
        if word in seen:
            continue
        seen.add(word)
        words.append(word)
        ids.append(int(idx))
    return words, ids


def _nearest_neighbours(emb: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of every row (the row itself first), in chunks."""
    x = torch.from_numpy(emb).float()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = x.shape[0]
    k = min(k, n)
    idx_out = np.empty((n, k), dtype=np.int32)
    sim_out = np.empty((n, k), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, n, chunk):
            sims = x[s : s + chunk] @ x.T
            rows = torch.arange(s, min(s + chunk, n))
            sims[rows - s, rows] = 2.0  # itself first (TextAttack skips column 0)
            top = sims.topk(k, dim=1)
            idx_out[s : s + chunk] = top.indices.numpy()
            sim_out[s : s + chunk] = top.values.numpy()
    sim_out[:, 0] = 1.0
    return idx_out, sim_out


def embedding_for_target(target: Any, *, cache_dir: Path, neighbours: int = 50) -> tuple[Any, dict[str, Any]]:
    """A TextAttack `WordEmbedding` over the target's input embeddings (whole words only) with a precomputed
    nearest-neighbour matrix, cached on disk under `<cache>/textattack/embedding_nn/<sha256>.npz` keyed by
    the embedding weights, the vocabulary and `neighbours`."""
    weight = target.embedding_layer().weight.detach().float().cpu()
    words, ids = whole_word_vocab(target.tokenizer)
    if len(words) < 2:
        raise ValueError(
            "the target's tokenizer has fewer than 2 whole-word vocabulary entries; the embedding "
            "word swap needs a word-level vocabulary"
        )
    emb = weight[torch.as_tensor(ids)].numpy().astype(np.float32)
    h = hashlib.sha256()
    h.update(json.dumps({"v": NN_CACHE_VERSION, "k": neighbours, "shape": list(weight.shape)}).encode())
    h.update(weight.contiguous().numpy().tobytes())
    h.update("\n".join(f"{w}\t{i}" for w, i in zip(words, ids)).encode())
    key = h.hexdigest()
    path = Path(cache_dir).expanduser() / "textattack" / "embedding_nn" / f"{key}.npz"
    hit = path.exists()
    nn_idx: np.ndarray | None = None
    if hit:
        try:
            with np.load(path) as z:
                nn_idx, nn_sim = z["nn"], z["sim"]
        except (OSError, KeyError, ValueError):
            hit = False
    if not hit or nn_idx is None:
        nn_idx, nn_sim = _nearest_neighbours(emb, neighbours + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, nn=nn_idx, sim=nn_sim)
        os.replace(tmp, path)
    word2index = {w: i for i, w in enumerate(words)}
    index2word = dict(enumerate(words))
    embedding = WordEmbedding(emb, word2index, index2word, nn_idx)
    info = {
        "vocabulary_words": len(words),
        "neighbours": int(nn_idx.shape[1] - 1),
        "cache_key": key,
        "cache_hit": bool(hit),
        "cache_file": str(path),
    }
    return embedding, info


class MaxModificationRateFloor(MaxModificationRate):
    """TextAttack's `MaxModificationRate` rounds the limit up (ceil(0.2 x 17) = 4 words = 23.5%); this one rounds
    down, so a text never has more than `max_rate` of its words changed, except that `min_threshold` words (1)
    may always change."""

    def _get_modifiable_indices(self, current_text: Any) -> set[int]:
        import math

        threshold = max(math.floor(current_text.num_words * self.max_rate + 1e-9), self.min_threshold)
        if len(current_text.attack_attrs["modified_indices"]) >= threshold:
            return set()
        return set(range(len(current_text.words)))


class SentimentPolarityFilter(Constraint):
    """Refuses a word swap that may change a sentiment label: a curated antonym pair, words of opposite polarity
    in the lexicon, or a negation word added or removed (`fmaudit.robustness.text_polarity.swap_conflict`).
    Every swapped position is compared with the original text, so a chain of swaps cannot walk good -> fine ->
    bad. Counts refusals by reason in `refused`."""

    def __init__(self) -> None:
        super().__init__(compare_against_original=True)
        from fmaudit.robustness.text_polarity import polarity_lexicon

        self.lexicon_size, self.lexicon_source = len(polarity_lexicon()[0]), polarity_lexicon()[1]
        self.refused: dict[str, int] = {}

    def _check_constraint(self, transformed_text: Any, reference_text: Any) -> bool:
        from fmaudit.robustness.text_polarity import swap_conflict

        words_a, words_b = reference_text.words, transformed_text.words
        for i in reference_text.all_words_diff(transformed_text):
            if i < len(words_a) and i < len(words_b):
                why = swap_conflict(words_a[i], words_b[i])
                if why is not None:
                    self.refused[why] = self.refused.get(why, 0) + 1
                    return False
        return True

    def check_compatibility(self, transformation: Any) -> bool:
        return transformation_consists_of_word_swaps(transformation)

    def extra_repr_keys(self) -> list[str]:
        return ["lexicon_source", "lexicon_size"] + super().extra_repr_keys()


class MiniLMSentenceSimilarity(SentenceEncoder):
    """TextAttack `SentenceEncoder` constraint over the bundled all-MiniLM-L6-v2 sentence encoder (mean-pooled,
    normalized): the offline stand-in for TextFooler's Universal Sentence Encoder constraint. By default the
    whole perturbed text is compared with the original (cosine >= 0.8); TextFooler compares a 15-word window
    with the previous text at angular similarity 0.84."""

    def __init__(
        self,
        threshold: float = 0.8,
        metric: str = "cosine",
        compare_against_original: bool = True,
        window_size: int | None = None,
        skip_text_shorter_than_window: bool = False,
    ):
        from fmaudit.robustness.text_similarity import MiniLMSentenceEncoder

        super().__init__(
            threshold=threshold,
            metric=metric,
            compare_against_original=compare_against_original,
            window_size=window_size,
            skip_text_shorter_than_window=skip_text_shorter_than_window,
        )
        self.encoder = MiniLMSentenceEncoder()
        self.encoder_name = self.encoder.name
        if not window_size:
            # TextAttack turns "no window" into an infinite window, which compares the span from the first to the
            # last word (leading / trailing punctuation, @ and # dropped). None here: the whole texts are compared.
            self.window_size = None

    def encode(self, sentences: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(self.encoder.encode(list(sentences)))

    def _sim_score(self, starting_text: Any, transformed_text: Any) -> torch.Tensor:
        if self.window_size:
            return super()._sim_score(starting_text, transformed_text)
        emb = self.encode([starting_text.text, transformed_text.text])
        return self.sim_metric(emb[:1], emb[1:])[0]

    def extra_repr_keys(self) -> list[str]:
        return ["encoder_name"] + super().extra_repr_keys()


WIR_METHODS = ("delete", "unk", "gradient", "weighted-saliency")
BEAM_WIDTH = 4
# embedding-swap search name -> its TextAttack search method: GreedyWordSwapWIR with each word-importance ranking;
# greedy = every position and candidate at each step, the best kept (GreedySearch); beam = BeamSearch.
SEARCH_METHODS: dict[str, Callable[[], Any]] = {
    **{wir: functools.partial(GreedyWordSwapWIR, wir_method=wir) for wir in WIR_METHODS},
    "greedy": GreedySearch,
    "beam": functools.partial(BeamSearch, beam_width=BEAM_WIDTH),
}
SEARCHES = tuple(SEARCH_METHODS)


def build_embedding_swap(
    wrapper: TargetModelWrapper,
    embedding: Any,
    *,
    max_candidates: int,
    min_cos_sim: float,
    max_modification_rate: float,
    polarity_filter: bool = True,
    sentence_similarity: float | None = 0.8,
    search: str = "delete",
) -> Any:
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; one of {', '.join(SEARCHES)}")
    transformation = WordSwapEmbedding(max_candidates=max_candidates, embedding=embedding)
    constraints = [
        RepeatModification(),
        StopwordModification(stopwords=set(NLTK_ENGLISH_STOPWORDS)),
        MaxModificationRateFloor(max_rate=float(max_modification_rate), min_threshold=1),
        WordEmbeddingDistance(embedding=embedding, min_cos_sim=float(min_cos_sim)),
    ]
    if polarity_filter:
        constraints.append(SentimentPolarityFilter())
    if sentence_similarity is not None:
        constraints.append(MiniLMSentenceSimilarity(threshold=float(sentence_similarity)))
    goal = UntargetedClassification(wrapper)
    return Attack(goal, constraints, transformation, SEARCH_METHODS[search]())


@contextlib.contextmanager
def _redirect_masked_lm(path: str | None) -> Iterator[None]:
    """While building a recipe, load the masked LM from a local folder instead of the hub name it hardcodes."""
    if path is None:
        yield
        return
    import importlib

    mods = [
        importlib.import_module(m)
        for m in (
            "textattack.transformations.word_swaps.word_swap_masked_lm",
            "textattack.transformations.word_insertions.word_insertion_masked_lm",
            "textattack.transformations.word_merges.word_merge_masked_lm",
        )
    ]
    saved = [(m, m.AutoModelForMaskedLM, m.AutoTokenizer) for m in mods]

    class _Redirect:
        def __init__(self, real: Any):
            self.real = real

        def from_pretrained(self, name: Any, *args: Any, **kwargs: Any) -> Any:
            return self.real.from_pretrained(path if isinstance(name, str) else name, *args, **kwargs)

    try:
        for m, lm, tok in saved:
            m.AutoModelForMaskedLM, m.AutoTokenizer = _Redirect(lm), _Redirect(tok)  # type: ignore[attr-defined]
        yield
    finally:
        for m, lm, tok in saved:
            m.AutoModelForMaskedLM, m.AutoTokenizer = lm, tok  # type: ignore[attr-defined]


def build_attack(
    name: str, wrapper: TargetModelWrapper, *, params: Any, target: Any, cache_dir: Path
) -> tuple[Any, dict[str, Any]]:
    """The TextAttack `Attack` for `name`, with the query budget and batch size set. Returns (attack, info)."""
    info: dict[str, Any] = {}
    if name == EMBEDDING_SWAP:
        embedding, info["embedding"] = embedding_for_target(
            target, cache_dir=cache_dir, neighbours=max(params.max_candidates, 50)
        )
        attack = build_embedding_swap(
            wrapper,
            embedding,
            max_candidates=params.max_candidates,
            min_cos_sim=params.min_cos_sim,
            max_modification_rate=params.max_modification_rate,
            polarity_filter=params.polarity_filter,
            sentence_similarity=params.min_sentence_sim,
            search=params.search,
        )
    else:
        import textattack.attack_recipes as recipes

        cls = getattr(recipes, TEXTATTACK_RECIPES[name])
        kwargs: dict[str, Any] = {}
        if name == "pruthi":
            kwargs["max_num_word_swaps"] = params.max_word_swaps
        masked_lm = params.masked_lm if name in MASKED_LM_DEFAULTS else None
        with _redirect_masked_lm(masked_lm):
            attack = cls.build(wrapper, **kwargs)
    gf = attack.goal_function
    gf.batch_size = max(int(params.batch_size), 1)
    if params.query_budget is not None:
        gf.query_budget = int(params.query_budget)
    return attack, info


def constraint_table(attack: Any) -> list[dict[str, Any]]:
    """Each constraint of an attack with its thresholds (TextAttack's own `extra_repr_keys`)."""
    out = []
    for c in list(attack.pre_transformation_constraints) + list(attack.constraints):
        entry: dict[str, Any] = {"constraint": type(c).__name__}
        for k in c.extra_repr_keys():
            if k in ("embedding", "stopwords"):
                continue
            v = getattr(c, k, None)
            if isinstance(v, float) and not np.isfinite(v):
                entry[k] = None  # TextAttack's "no window" is inf; JSON has no infinity
            elif isinstance(v, (bool, int, float, str)) or v is None:
                entry[k] = v
            elif isinstance(v, (set, frozenset, list, tuple)):
                entry[k] = f"{len(v)} items"
            else:
                entry[k] = str(v)
        if type(c).__name__ == "StopwordModification":
            entry["num_stopwords"] = len(getattr(c, "stopwords", ()))
        out.append(entry)
    return out


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def marked_diff(result: Any) -> tuple[str, str]:
    """Original and perturbed text with changed words wrapped in [[...]] (TextAttack's "file" marking,
    computed without its language detection)."""
    t1 = result.original_result.attacked_text
    t2 = result.perturbed_result.attacked_text
    index_map = t2.attack_attrs.get("original_index_map")
    if index_map is None:
        index_map = np.arange(t1.num_words)
    w1, equal2 = [], set()
    for i1, i2 in enumerate(index_map):
        if i2 == -1 or t1.words[i1] != t2.words[i2]:
            w1.append(i1)
        else:
            equal2.add(int(i2))
    w2 = sorted(set(range(t2.num_words)) - equal2)
    a = t1.replace_words_at_indices(w1, [f"[[{t1.words[i]}]]" for i in w1]) if w1 else t1
    b = t2.replace_words_at_indices(w2, [f"[[{t2.words[i]}]]" for i in w2]) if w2 else t2
    return a.printable_text(), b.printable_text()
