"""A causal LM used as a zero- / few-shot text classifier: a prompt template around the text and a verbalizer
(label words per class). The class logits are next-token log-probabilities of the label words after the prompt.

Scoring: each label word is scored by its FIRST token's log-probability at the prompt's last position (several
words of one class: log of the summed probabilities, i.e. logsumexp). One forward pass scores every class, which
keeps attacks (thousands of queries per example) affordable; the words' first tokens must differ between classes,
which the recipe check and the constructor enforce. Scoring whole multi-token words would cost one more forward
pass per label word and is not done.

The target is a text classifier like `TextClassifier`: its features are the TEXT's tokens only. The template's
tokens are fixed buffers added inside the wrapped module (`PromptedLM`), so TextAttack perturbs and Captum
attributes the text and never the template; the prefix and suffix are embedded without calling the embedding
module, so layer attributions hooked on it see the text's embeddings only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fmaudit.targets.base import TargetError
from fmaudit.targets.text import TextClassifier

TEXT_FIELD = "{text}"
PROMPTED_KIND = "prompted-lm"


def split_template(template: str) -> tuple[str, str, str]:
    """(prefix, leading whitespace of the text, suffix) of a template holding `{text}` exactly once. Whitespace
    just before `{text}` travels with the text: byte-level BPE tokenizers attach a leading space to the word."""
    if template.count(TEXT_FIELD) != 1:
        raise TargetError(
            f"the prompt template must contain {TEXT_FIELD} exactly once (found "
            f"{template.count(TEXT_FIELD)}): {template!r}"
        )
    other = [f for f in re.findall(r"\{[^{}]*\}", template) if f != TEXT_FIELD]
    if other:
        raise TargetError(f"the prompt template may hold only {TEXT_FIELD}; found {', '.join(other)}")
    prefix, suffix = template.split(TEXT_FIELD)
    if not suffix:
        raise TargetError(
            f"the prompt template needs text after {TEXT_FIELD} (e.g. '\\nSentiment:'): the label "
            "words are scored as the next token after it"
        )
    stripped = prefix.rstrip(" ")
    return stripped, prefix[len(stripped) :], suffix


def normalize_label_words(label_words: Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
    """Label -> its words (a single word may be given as a string), in the verbalizer's order."""
    out = {str(k): [v] if isinstance(v, str) else [str(w) for w in v] for k, v in label_words.items()}
    for label, words in out.items():
        if not words or any(not w.strip() for w in words):
            raise TargetError(f"label {label!r} needs at least one non-empty label word")
    if len(out) < 2:
        raise TargetError("a verbalizer needs at least two labels")
    return out


def label_first_tokens(tokenizer: Any, label_words: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
    """Label -> the distinct first token ids of its words. Raises when a word gives no token or two labels
    share a first token (the classifier could not tell them apart)."""
    out: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for label, words in label_words.items():
        ids: list[int] = []
        for w in words:
            toks = tokenizer(w, add_special_tokens=False)["input_ids"]
            if not toks:
                raise TargetError(f"label word {w!r} of label {label!r} gives no token")
            first = int(toks[0])
            if owner.get(first, label) != label:
                piece = tokenizer.convert_ids_to_tokens([first])[0]
                raise TargetError(
                    f"label words of {owner[first]!r} and {label!r} start with the same token "
                    f"{piece!r}; only first tokens are scored, so pick words that differ there"
                )
            owner[first] = label
            if first not in ids:
                ids.append(first)
        out[label] = ids
    return out


def prompt_ids(tokenizer: Any, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Token ids of the template's prefix (with the tokenizer's leading special token, e.g. BOS, when it adds
    one; special tokens it appends at the end are dropped) and of its suffix (no special tokens). A prompt
    must start with something for the first text token to attend to: an empty prefix without a BOS gets the
    EOS token, as GPT-2 uses it. The suffix must not be empty: every row ends with it, where the label words
    are read."""
    special = set(tokenizer.all_special_ids)
    pre = list(tokenizer(prefix, add_special_tokens=True)["input_ids"]) if prefix else []
    if not prefix:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        pre = [int(bos)] if bos is not None else []
    while pre and pre[-1] in special and len(pre) > 1:
        pre.pop()
    suf = list(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else []
    if not pre:
        raise TargetError(
            "the prompt has no token before {text} and the tokenizer has no BOS / EOS token to start with"
        )
    if not suf:
        raise TargetError(
            f"the template needs text after {TEXT_FIELD} (e.g. '\\nSentiment:'): the label words are "
            "read right after it"
        )
    return pre, suf


class PromptedLM(nn.Module):
    """`nn.Module` view of the prompted classifier: text token ids (or their embeddings) -> class logits.

    Rows are laid out prefix | text (right-padded) | suffix, with the text's padding masked and position ids
    counted over real tokens only, so every row ends at the suffix's last token, where the label words are read.
    """

    def __init__(
        self,
        lm: nn.Module,
        prefix_ids: Sequence[int],
        suffix_ids: Sequence[int],
        label_token_ids: Sequence[Sequence[int]],
    ):
        super().__init__()
        self.lm = lm
        self.register_buffer("prefix_ids", torch.tensor(list(prefix_ids), dtype=torch.long))
        self.register_buffer("suffix_ids", torch.tensor(list(suffix_ids), dtype=torch.long))
        self.label_token_ids = [list(ids) for ids in label_token_ids]

    def get_input_embeddings(self) -> nn.Module:
        layer: nn.Module = self.lm.get_input_embeddings()  # type: ignore[operator]  # an HF PreTrainedModel
        return layer

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.get_input_embeddings()
        text = emb(input_ids) if inputs_embeds is None else inputs_embeds
        b, length = text.shape[:2]
        mask = (
            attention_mask
            if attention_mask is not None
            else torch.ones(b, length, dtype=torch.long, device=text.device)
        )
        if mask.shape[0] == 1 and b != 1:
            mask = mask.expand(b, -1)
        # The template's tokens are looked up in the embedding matrix directly: a hook on the embedding
        # module (Captum's layer methods) sees only the text.
        prefix_ids, suffix_ids, weight = self.prefix_ids, self.suffix_ids, emb.weight
        assert isinstance(prefix_ids, torch.Tensor) and isinstance(suffix_ids, torch.Tensor)
        assert isinstance(weight, torch.Tensor)
        pre = nn.functional.embedding(prefix_ids, weight).unsqueeze(0).expand(b, -1, -1)
        suf = nn.functional.embedding(suffix_ids, weight).unsqueeze(0).expand(b, -1, -1)
        full = torch.cat([pre.to(text.dtype), text, suf.to(text.dtype)], dim=1)
        ones = mask.new_ones
        full_mask = torch.cat([ones(b, pre.shape[1]), mask.to(torch.long), ones(b, suf.shape[1])], dim=1)
        positions = (full_mask.cumsum(1) - 1).clamp_min(0)
        out = self.lm(inputs_embeds=full, attention_mask=full_mask, position_ids=positions, use_cache=False)
        logp = out.logits[:, -1, :].float().log_softmax(-1)
        return torch.stack([logp[:, ids].logsumexp(-1) for ids in self.label_token_ids], dim=1)


class PromptedClassifier(TextClassifier):
    """A causal LM as a text classifier through a prompt template and a verbalizer (see the module docstring).
    Class i is the verbalizer's i-th label; the logits are log-probabilities (<= 0) of the label words."""

    kind = PROMPTED_KIND

    def __init__(
        self,
        *,
        name: str,
        lm: nn.Module,
        tokenizer: Any,
        source: str,
        template: str,
        label_words: Mapping[str, str | Sequence[str]],
        device: str = "cpu",
        max_length: int = 128,
    ):
        prefix, self.text_lead, suffix = split_template(template)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.template = template
        self.label_words = normalize_label_words(label_words)
        first = label_first_tokens(tokenizer, self.label_words)
        pre, suf = prompt_ids(tokenizer, prefix, suffix)
        wrapped = PromptedLM(lm, pre, suf, [first[k] for k in self.label_words])
        super().__init__(
            name=name,
            model=wrapped,
            tokenizer=tokenizer,
            source=source,
            device=device,
            max_length=max_length,
            label_names=list(self.label_words),
        )
        self.label_tokens = {k: tokenizer.convert_ids_to_tokens(v) for k, v in first.items()}

    @property
    def architecture(self) -> str:
        return f"PromptedLM({type(self.model.lm).__name__})"

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """The text's own tokens (no special tokens), truncated to max_length; the template is added inside
        the module."""
        enc = self.tokenizer(
            [self.text_lead + t for t in texts], truncation=True, max_length=self.max_length, add_special_tokens=False
        )
        return [list(x) for x in enc["input_ids"]]


def prompted_from_causal_lm(
    lm_target: Any,
    *,
    template: str,
    label_words: Mapping[str, str | Sequence[str]],
    label_names: Sequence[str] | None = None,
) -> PromptedClassifier:
    """Wrap a loaded `CausalLM` target as a PromptedClassifier. `label_names` (the data's classes, when known)
    must be the verbalizer's labels in the same order: class i of the data is label word set i."""
    words = normalize_label_words(label_words)
    if label_names is not None and list(label_names) != list(words):
        raise TargetError(
            f"the verbalizer's labels {list(words)} must be the data's labels {list(label_names)}, in that order"
        )
    return PromptedClassifier(
        name=lm_target.name,
        lm=lm_target.model,
        tokenizer=lm_target.tokenizer,
        source=f"{lm_target.source} (prompted)",
        template=template,
        label_words=words,
        device=str(lm_target.device),
        max_length=lm_target.max_length,
    )
