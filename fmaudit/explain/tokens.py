"""Token features (text classifiers and causal LMs): special tokens are never features, and a removed token is
replaced by one baseline token (pad, unk or mask), so `[CLS] good movie [SEP]` has the baseline
`[CLS] pad pad [SEP]`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fmaudit.explain.space import Example


def baseline_token_id(tokenizer: Any, kind: str) -> int:
    """The id of the `kind` (pad | unk | mask) token; a ValueError naming the choices when there is none."""
    tid = {"pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id, "mask": tokenizer.mask_token_id}[kind]
    if tid is None:
        raise ValueError(
            f"the tokenizer has no {kind} token to use as the attribution baseline; "
            "choose another text_baseline (pad | unk | mask)"
        )
    return int(tid)


class TokenBaseline:
    """The baseline token of a tokenizer, its special ids, and inputs composed from kept tokens."""

    def __init__(self, tokenizer: Any, kind: str):
        self.kind = kind
        self.token_id = baseline_token_id(tokenizer, kind)
        self.special = sorted(set(int(i) for i in tokenizer.all_special_ids))

    def compose(self, ex: Example, keep: Any) -> torch.Tensor:
        """(K, length) token ids: `ex.x` with the features (tokens at `ex.feat_pos`) where `keep` is False set
        to the baseline token."""
        import torch

        keep = torch.as_tensor(keep, device=ex.x.device).bool()
        ids = ex.x.expand(keep.shape[0], -1).clone()
        fp = torch.as_tensor(ex.feat_pos, device=ids.device)
        sub = ids[:, fp]
        ids[:, fp] = torch.where(keep, sub, torch.full_like(sub, self.token_id))
        return ids

    def describe(self) -> dict[str, Any]:
        return {"token": self.kind, "token_id": self.token_id}
