"""A kit for module authors: run a module outside a recipe.

    from fmaudit.testing import audit_context
    outcome = MyModule({"max_examples": 8}).run(target, audit_context(tmp_path, data=my_data))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fmaudit.audits.base import AuditContext
    from fmaudit.data import Dataset, Split
    from fmaudit.targets.base import Target


def audit_context(work: str | Path, *, data: "Dataset | None" = None, split: "Split | None" = None,
                  base: "Target | None" = None, targets: dict[str, "Target"] | None = None, seed: int = 0,
                  unit_id: str = "0:module@target", store_examples: bool = False, device: str = "cpu",
                  executor: Any = None, progress: Any = None) -> "AuditContext":
    """An AuditContext writing under `work` (artifacts in work/, cache in work/cache). `base`: the weights the
    audited target was fine-tuned from (reference models, DP twins and canary runs start there);
    `targets`: other targets a module may name. Work runs in this process unless `executor` is given."""
    from fmaudit.audits.base import AuditContext
    from fmaudit.audits.services import FixedServices
    from fmaudit.executor import LocalExecutor

    work = Path(work)
    services = FixedServices(base=base, targets=targets) if base is not None or targets else None
    return AuditContext(unit_id=unit_id, seed=seed, device=device, run_dir=work, cache_dir=work / "cache",
                        store_examples=store_examples, data=data, split=split, progress=progress,
                        executor=executor or LocalExecutor(), services=services)
