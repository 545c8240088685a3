"""Importing TextAttack through fmaudit: no network, no download attempt, environment and loggers untouched,
NLTK data only in fmaudit's cache. Runs in a fresh interpreter (the import happens once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, logging, os, socket, sys
    attempts = []
    def refuse(*a, **k):
        attempts.append(repr(a)[:120])
        raise OSError("network disabled in this test")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    import nltk
    nltk.download = lambda *a, **k: attempts.append(("nltk.download", a)) or False

    probe = logging.getLogger("fmaudit.probe")
    before = dict(os.environ)
    from fmaudit.audits.robustness.textattack_env import import_textattack
    import_textattack()
    changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))

    # build and run an attack that needs the stopwords corpus, still offline
    from fmaudit.targets import load_target
    from fmaudit.audits.robustness import text_attack_engine as engine
    from fmaudit.audits.robustness.text_attack import TextAttackAudit
    target = load_target(model=sys.argv[1], task="text-classification", num_labels=2, max_length=32)
    p = TextAttackAudit.Params(attack="deepwordbug", query_budget=50)
    attack, _ = engine.build_attack("deepwordbug", engine.TargetModelWrapper(target), params=p, target=target,
                                    cache_dir=os.environ["FMAUDIT_CACHE_DIR"])
    engine.seed_all(0)
    r = attack.attack("the movie was really good today", 1)
    changed_after = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
    print("RESULT" + json.dumps({
        "changed": changed, "changed_after_attack": changed_after, "attempts": [str(a) for a in attempts],
        "probe_disabled": probe.disabled, "result": type(r).__name__,
        "home_textattack": os.path.exists(os.path.expanduser("~/.cache/textattack")),
        "home_nltk": os.path.exists(os.path.expanduser("~/nltk_data")),
    }))
""")


def test_import_is_offline_and_leaves_environment_untouched(tmp_path, tiny_bert_dir):
    home = tmp_path / "home"
    home.mkdir()
    cache = tmp_path / "fmcache"
    env = {k: v for k, v in os.environ.items() if k not in ("TA_CACHE_DIR", "NLTK_DATA")}
    env.update(
        HOME=str(home),
        FMAUDIT_CACHE_DIR=str(cache),
        HF_HOME=str(tmp_path / "hf"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    env.pop("PYTORCH_TRANSFORMERS_CACHE", None)  # unset stays unset
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_bert_dir)], capture_output=True, text=True, env=env, timeout=240
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    res = json.loads(line[len("RESULT") :])
    assert res["changed"] == [], f"import_textattack changed environment variables: {res['changed']}"
    assert res["changed_after_attack"] == []
    assert res["attempts"] == [], f"network or download attempts: {res['attempts']}"
    assert res["probe_disabled"] is False  # TextAttack's dictConfig disabled existing loggers; we re-enable them
    assert res["result"] in ("SuccessfulAttackResult", "FailedAttackResult", "SkippedAttackResult")
    assert not res["home_textattack"] and not res["home_nltk"]
    assert (cache / "textattack" / "nltk_data" / "corpora" / "stopwords" / "english").exists()
    assert (cache / "textattack" / "post_install_check_3").exists()


def test_module_import_is_light():
    """Importing the module (what `fmaudit list/validate` does) pulls in neither torch nor TextAttack."""
    code = (
        "import sys; import fmaudit.audits.robustness.text_attack as m; "
        "m.TextAttackAudit.Params(attack='pruthi'); "
        "print([x for x in ('torch', 'textattack', 'transformers', 'nltk') if x in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["deepwordbug", "pruthi", "input-reduction", "embedding-swap"])
def test_offline_attacks_need_no_resources(name, tmp_path):
    from fmaudit.audits.robustness.text_attack_recipes import ResourceContext, missing_resources

    rc = ResourceContext(ta_cache=tmp_path, nltk_dir=tmp_path / "nltk", masked_lm=None)
    assert missing_resources(name, rc) == []


STALE = textwrap.dedent(r"""
    import shutil, sys
    import nltk
    from fmaudit.audits.robustness.textattack_env import import_textattack
    first, second = sys.argv[1], sys.argv[2]
    import_textattack(first)
    assert len(nltk.corpus.stopwords.words("english")) == 179  # loaded from the first cache dir
    shutil.rmtree(first)  # e.g. a temporary cache, deleted after its run
    import_textattack(second)
    from textattack.constraints.pre_transformation import StopwordModification
    print("RESULT", len(StopwordModification().stopwords))
""")


def test_a_deleted_earlier_cache_does_not_break_later_attacks(tmp_path):
    """Two audits in one process with different cache dirs, the first deleted in between (as pytest's
    tmp_path folders are): TextAttack's default stopword constraint still finds the corpus."""
    env = {k: v for k, v in os.environ.items() if k not in ("TA_CACHE_DIR", "NLTK_DATA")}
    env["HOME"] = str(tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", STALE, str(tmp_path / "first"), str(tmp_path / "second")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RESULT 179" in res.stdout
