"""Import TextAttack safely: offline, without downloads, without changing the process environment.

`import textattack` (0.3.11) has three side effects that break an offline auditing toolkit:

1. it builds `StopwordModification()` at import, which needs the NLTK `stopwords` corpus;
2. on the first import it runs `nltk.download(...)` six times (and a stanza download) unless a marker file
   `post_install_check_3` exists in its cache folder;
3. it overwrites `HF_HOME`, `XDG_CACHE_HOME`, `PYTORCH_TRANSFORMERS_CACHE`, `TFHUB_CACHE_DIR` (when
   `TA_CACHE_DIR` is set), `TOKENIZERS_PARALLELISM`, and its dependencies set `WANDB_SILENT` and
   `TORCHINDUCTOR_CACHE_DIR`; and its `logging.config.dictConfig` call disables every logger that existed
   before the import.

`import_textattack()` handles all three: it writes NLTK's English stopword list into an NLTK data folder
inside fmaudit's cache dir (`<cache>/textattack/nltk_data`, added to `nltk.data.path`, not to the
environment), points TextAttack's cache at `<cache>/textattack` with the post-install marker already in
place (so no download is attempted), imports the libraries that read the environment at import time
*before* the variables change, and afterwards restores `os.environ` exactly and re-enables the loggers it
disabled. Nothing here imports torch or TextAttack at module import time.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

# NLTK's English stopword corpus (179 words), the list TextAttack's StopwordModification() loads by default.
NLTK_ENGLISH_STOPWORDS: tuple[str, ...] = tuple(
    """
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had having do does did doing a an the and but
if or because as until while of at by for with about against between into through during before after above below
to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split()
)

POST_INSTALL_MARKER = "post_install_check_3"  # TextAttack 0.3.11's "NLTK downloads done" marker
# Imported before TextAttack changes the environment, so their import-time settings (cache paths) are the
# user's, not TextAttack's.
_PREIMPORT = ("torch", "transformers", "huggingface_hub", "datasets", "nltk")

_lock = threading.Lock()
_state: dict[str, object] = {}


def textattack_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder fmaudit gives TextAttack (its downloads, our NLTK data, precomputed neighbours)."""
    if cache_dir is None:
        from fmaudit.training import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "textattack"


def nltk_data_dir(cache_dir: str | Path | None = None) -> Path:
    return textattack_cache_dir(cache_dir) / "nltk_data"


def prepare_cache(cache_dir: str | Path | None = None) -> Path:
    """Create TextAttack's cache folder with the stopwords corpus and the post-install marker."""
    root = textattack_cache_dir(cache_dir)
    sw = nltk_data_dir(cache_dir) / "corpora" / "stopwords"
    sw.mkdir(parents=True, exist_ok=True)
    english = sw / "english"
    content = "\n".join(NLTK_ENGLISH_STOPWORDS) + "\n"
    if not english.exists() or english.read_text(encoding="utf-8") != content:
        tmp = sw / f".english.{os.getpid()}.tmp"
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, english)
    marker = root / POST_INSTALL_MARKER
    if not marker.exists():
        marker.touch()
    return root


def _forget_missing_stopwords(nltk: ModuleType) -> None:
    """NLTK's lazy `stopwords` corpus binds to the folder it first loaded from. When that folder is gone (an
    earlier run's cache dir, deleted since), every later `StopwordModification()` fails; unload it so the next
    use finds the corpus again on `nltk.data.path`."""
    corpus = nltk.corpus.stopwords
    root = getattr(corpus, "_root", None)  # only a loaded corpus has a root
    path = getattr(root, "path", None)
    if path is not None and not os.path.exists(path) and hasattr(corpus, "_unload"):
        corpus._unload()


def _logger_states() -> dict[str, bool]:
    return {
        name: lg.disabled for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)
    }


def import_textattack(cache_dir: str | Path | None = None) -> ModuleType:
    """Import TextAttack offline and return the module; the environment is left exactly as it was.

    The first call in a process decides TextAttack's cache folder (`<cache_dir>/textattack`); later calls
    return the already imported module (and make sure our NLTK folder is on `nltk.data.path`).
    """
    with _lock:
        root = prepare_cache(cache_dir)
        import importlib

        for name in _PREIMPORT:
            try:
                importlib.import_module(name)
            except ImportError:  # pragma: no cover - optional dependency missing
                pass
        import nltk

        data_dir = str(nltk_data_dir(cache_dir))
        if data_dir not in nltk.data.path:
            nltk.data.path.insert(0, data_dir)
        _forget_missing_stopwords(nltk)
        if "textattack" in sys.modules and _state.get("imported"):
            return sys.modules["textattack"]
        if "textattack" in sys.modules:  # imported by someone else (outside fmaudit): use it as it is
            _state["imported"] = True
            _state["cache_dir"] = None
            return sys.modules["textattack"]

        saved_env = dict(os.environ)
        saved_loggers = _logger_states()
        try:
            os.environ["TA_CACHE_DIR"] = str(root)
            import textattack  # noqa: F401  (the side effects above happen here)
        finally:
            for key in list(os.environ):
                if key not in saved_env:
                    del os.environ[key]
            for key, value in saved_env.items():
                if os.environ.get(key) != value:
                    os.environ[key] = value
            for name, lg in logging.Logger.manager.loggerDict.items():
                if isinstance(lg, logging.Logger) and name in saved_loggers:
                    lg.disabled = saved_loggers[name]
        for name in list(logging.Logger.manager.loggerDict):
            if name == "textattack" or name.startswith("textattack."):
                logging.getLogger(name).setLevel(logging.WARNING)  # its INFO chatter ("compatible with model")
        _state["imported"] = True
        _state["cache_dir"] = str(root)
        return sys.modules["textattack"]


def textattack_cache_in_use() -> str | None:
    """The cache folder TextAttack was imported with by `import_textattack` (None: not yet / not by us)."""
    return _state.get("cache_dir")  # type: ignore[return-value]
