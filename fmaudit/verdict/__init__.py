"""One verdict per area (privacy, robustness, explainability, utility), derived from a `RunReport`.

Pure functions over the report (standard library and `fmaudit.report` only: the dashboard, the HTML export
and the terminal summary all call them and none of them pays for torch). Layout:

- `levels`: the levels, their colours and words, and the `Part` / `Verdict` records;
- `reading`: what the rules read from a report (metric values, formatted numbers, target names);
- `rules`: every rule, one function per module in the `RULES` registry (the rules are documented there);
- `areas`: the verdict of each area from its units' parts, failed gates and errored units;
- `render`: the verdicts as terminal lines.
"""

from fmaudit.verdict.areas import area_verdict, verdicts, verdicts_from_results
from fmaudit.verdict.levels import (
    AREA_OF_CATEGORY,
    AREAS,
    COLOURS,
    LEVEL_RANK,
    LEVEL_WORDS,
    LEVELS,
    TERMINAL_STYLES,
    Part,
    Verdict,
    worse,
)
from fmaudit.verdict.reading import dp_twins, target_name
from fmaudit.verdict.render import verdict_lines
from fmaudit.verdict.rules import (
    DEFAULT_HEADLINES,
    RULES,
    attribution_part,
    canary_part,
    dp_part,
    generic_part,
    image_attack_part,
    membership_part,
    text_attack_part,
    utility_part,
)

__all__ = [
    "AREAS",
    "AREA_OF_CATEGORY",
    "COLOURS",
    "DEFAULT_HEADLINES",
    "LEVELS",
    "LEVEL_RANK",
    "LEVEL_WORDS",
    "RULES",
    "TERMINAL_STYLES",
    "Part",
    "Verdict",
    "area_verdict",
    "attribution_part",
    "canary_part",
    "dp_part",
    "dp_twins",
    "generic_part",
    "image_attack_part",
    "membership_part",
    "target_name",
    "text_attack_part",
    "utility_part",
    "verdict_lines",
    "verdicts",
    "verdicts_from_results",
    "worse",
]
