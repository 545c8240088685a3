"""explain.attribution's per-example evidence, most influential tokens and image heatmaps. Raw content (token
strings, texts, prompts, the input panel of a heatmap) only with `store_examples`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fmaudit.audits.base import AuditContext
from fmaudit.explain.image import ImageSpace
from fmaudit.explain.lm import LMSpace
from fmaudit.explain.space import Attribution, Example, FeatureSpace
from fmaudit.explain.text import TextSpace
from fmaudit.tasks import CAUSAL_LM, IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION

Attrs = dict[str, list[Attribution]]


def _image_part(
    space: ImageSpace, ex: Example, attrs: Attrs, store: bool, data: Any, heatmap: str | None
) -> dict[str, Any]:
    """The heatmap and the five strongest pixels (or patches) per method."""
    ev: dict[str, Any] = {"heatmap": heatmap}
    h, w = ex.x.shape[-2:]
    unit = space.feature_unit(h, w)
    cols = unit["grid"][1] if unit["unit"] == "patch" else w
    ev["top_patches" if unit["unit"] == "patch" else "top_pixels"] = {
        m: [
            {"row": int(k // cols), "col": int(k % cols), "score": float(a[ex.pos].features[k])}
            for k in np.argsort(-np.abs(a[ex.pos].features))[:5]
        ]
        for m, a in attrs.items()
    }
    if store:
        ev["image_shape"] = list(np.asarray(data.images[ex.meta["data_index"]]).shape)
    return ev


def _token_part(space: TextSpace | LMSpace, ex: Example, attrs: Attrs, store: bool) -> dict[str, Any]:
    """Per method one `{position, token_id, score}` per feature token, and IG's convergence delta."""
    tok = space.target.tokenizer
    ids = ex.x[0].tolist()
    ev: dict[str, Any] = {"num_tokens": len(ids), "attributions": {}}
    assert ex.feat_pos is not None  # token spaces always set the features' positions
    for m, alist in attrs.items():
        a = alist[ex.pos]
        rows = []
        for k, pos in enumerate(ex.feat_pos):
            row = {"position": int(pos), "token_id": int(ids[pos]), "score": float(a.features[k])}
            if store:
                row["token"] = tok.convert_ids_to_tokens(int(ids[pos]))
            rows.append(row)
        ev["attributions"][m] = rows
        if a.delta is not None:
            ev.setdefault("convergence_delta", {})[m] = a.delta
    return ev


def _text_part(
    space: TextSpace, ex: Example, attrs: Attrs, store: bool, data: Any, heatmap: str | None
) -> dict[str, Any]:
    ev = _token_part(space, ex, attrs, store)
    if store:
        ev["text"] = data.texts[ex.meta["data_index"]]
    return ev


def _lm_part(space: LMSpace, ex: Example, attrs: Attrs, store: bool, data: Any, heatmap: str | None) -> dict[str, Any]:
    ev = _token_part(space, ex, attrs, store)
    cont = ex.extra["continuation"].tolist()
    ev["continuation_token_ids"] = cont
    ev["continuation_logprob"] = ex.meta.get("f_x")
    if store:
        tok = space.target.tokenizer
        ev["prompt"] = tok.decode(ex.x[0].tolist())
        ev["continuation"] = tok.decode(cont)
    return ev


# Model task -> what an example's evidence adds to the labels and outputs every example has.
EVIDENCE: dict[str, Callable[..., dict[str, Any]]] = {
    TEXT_CLASSIFICATION: _text_part,
    IMAGE_CLASSIFICATION: _image_part,
    CAUSAL_LM: _lm_part,
}


def evidence(
    space: FeatureSpace,
    ex: Example,
    attrs: Attrs,
    *,
    names: Sequence[str] | None,
    store: bool,
    data: Any,
    heatmap: str | None,
) -> dict[str, Any]:
    """One example's evidence: labels, F(x), F(baseline), then the space's own part (`EVIDENCE`)."""

    def lab(i: int | None) -> Any:
        if i is None:
            return None
        return names[i] if names and i < len(names) else i

    ev: dict[str, Any] = {
        "id": ex.ex_id,
        "true_label": lab(ex.true_label),
        "predicted_label": lab(ex.predicted),
        "explained_label": lab(ex.explained),
        "f_x": ex.meta.get("f_x"),
        "f_baseline": ex.meta.get("f_b"),
    }
    if ex.meta.get("prob") is not None:
        ev["explained_probability"] = ex.meta["prob"]
    ev.update(EVIDENCE[space.model_task](space, ex, attrs, store, data, heatmap))
    return ev


def top_tokens(
    space: TextSpace | LMSpace, examples: Sequence[Example], alist: Sequence[Attribution], *, count: int, store: bool
) -> dict[str, Any]:
    """Tokens with the largest mean attribution across the set (scores L1-normalized per example so long
    or confident examples don't dominate)."""
    tok = space.target.tokenizer
    agg: dict[int, list[float]] = {}
    for ex, a in zip(examples, alist):
        s = a.features / max(float(np.abs(a.features).sum()), 1e-12)
        ids = ex.x[0].tolist()
        assert ex.feat_pos is not None
        for k, pos in enumerate(ex.feat_pos):
            agg.setdefault(int(ids[pos]), []).append(float(s[k]))
    stats = [(tid, float(np.mean(v)), len(v)) for tid, v in agg.items()]

    def rows(items: list[tuple[int, float, int]]) -> list[dict[str, Any]]:
        out = []
        for tid, mean, n in items[:count]:
            r: dict[str, Any] = {"token_id": tid, "mean_score": mean, "count": n}
            if store:
                r["token"] = tok.convert_ids_to_tokens(tid)
            out.append(r)
        return out

    return {
        "towards_explained": rows(sorted(stats, key=lambda t: -t[1])),
        "against_explained": rows(sorted(stats, key=lambda t: t[1])),
        "normalization": "per-example L1",
    }


def heatmaps(examples: Sequence[Example], attrs: Attrs, ctx: AuditContext) -> list[str]:
    """One small PNG per example: the input (with `store_examples`), then one panel per method (channel sum,
    diverging colormap, symmetric scale). Returns the paths relative to the run directory."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    d = ctx.artifact_dir()
    paths = []
    for ex in examples:
        panels = [("input", ex.x[0].detach().cpu().numpy().mean(0), "gray")] if ctx.store_examples else []
        for m, alist in attrs.items():
            panels.append((m, alist[ex.pos].full.sum(0), "bwr"))
        fig, axes = plt.subplots(1, len(panels), figsize=(1.7 * len(panels), 1.9), dpi=80)
        axes = np.atleast_1d(axes)
        for ax, (title, img, cmap) in zip(axes, panels):
            if cmap == "bwr":
                lim = float(np.abs(img).max()) or 1.0
                ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim)
            else:
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
            ax.set_title(title.replace("_", " "), fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in ex.ex_id)
        path = d / f"heatmap_{ex.pos:03d}_{safe}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(ctx.relative(path))
    return paths
