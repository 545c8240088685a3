"""Sentiment polarity and antonym checks for word-swap attacks.

An embedding-space word swap keeps words whose vectors are close, and raw model embeddings place antonyms
close together (MiniLM's input embeddings: good -> bad at cosine 0.53). A swap good -> bad changes the true
label of a sentiment example, so the "adversarial" example is not one. `swap_conflict` refuses a swap when

- the two words form a curated antonym pair (`ANTONYM_PAIRS`, sentiment and evaluation words), or
- they have opposite polarity in the lexicon (`POSITIVE` / `NEGATIVE`, curated here; extended with VADER's
  lexicon when the `vaderSentiment` package is installed, words with |mean valence| >= 1.0), or
- exactly one of them is a negation word (NLTK's VADER `NEGATE` list, which NLTK ships as code: no corpus
  download; a built-in copy otherwise).

No installed package here ships a polarity lexicon offline (NLTK's opinion lexicon and VADER lexicon are
corpus downloads), so the base lexicon is curated: common English evaluative words with unambiguous polarity.
A lexicon derived from the bundled tweets was tried and rejected: its strongest "negative" words are
airline names and its "positive" ones festival names, and `bad` is not significantly negative in it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

_POSITIVE = """
good great excellent amazing awesome wonderful fantastic fabulous terrific superb outstanding brilliant perfect
best better nice fine lovely beautiful pretty gorgeous cute happy glad joy joyful delighted pleased cheerful
love loved loves loving lovable like liked likes enjoy enjoyed enjoys enjoyable fun funny pleasant positive
favorite favourite impressive incredible marvelous marvellous magnificent exceptional remarkable splendid
cool nicest greatest finest glorious success successful successfully win wins won winner winning right
correct helpful useful valuable worthy worth recommend recommended thank thanks thankful grateful appreciate
appreciated kind kindly friendly fair fast smooth easy clean safe strong calm comfortable proud hope hopeful
excited exciting thrilled thrilling charming elegant fresh satisfied satisfying satisfy rich healthy
polite generous brave smart clever wise honest reliable superior inspiring inspired hilarious sweet smile
smiling laugh laughing blessed lucky fortunate rewarding pleasure pleasing perfectly well yay wow ok okay
masterpiece gem stunning flawless delightful delicious tasty welcome support supportive improve improved
improvement benefit beneficial advantage efficient effective accurate adore adored admire praise
"""
_NEGATIVE = """
bad worse worst terrible horrible awful poor dreadful horrendous atrocious abysmal lousy crappy crap shitty
sucks suck sucked hate hated hates hating dislike disliked dislikes sad unhappy upset angry mad annoyed
annoying annoy irritating furious disgusting disgusted gross nasty ugly boring bored dull tedious mediocre
disappointing disappointed disappointment disaster disastrous fail failed fails failure failing wrong
incorrect useless worthless pathetic ridiculous stupid dumb idiotic lame weak slow broken rude unfriendly
unfair unhelpful difficult hard hurt hurts painful pain problem problems trouble issue issues negative
miserable misery depressed depressing depression cry crying tears sorry regret regrets unfortunately
unfortunate fear afraid scared scary worried worry worrying anxious nervous ashamed shame embarrassing
dirty unsafe dangerous sick ill inferior loser lose loses losing lost cancel cancelled canceled delay
delayed late complaint complain complained frustrated frustrating frustration pissed rubbish garbage trash
junk fake inaccurate unreliable dishonest cheap overpriced expensive mess messy clumsy awkward terribly
horribly badly sadly poorly evil cruel nightmare outrage outraged offensive insult insulting damn ugh
"""
POSITIVE = frozenset(_POSITIVE.split())
NEGATIVE = frozenset(_NEGATIVE.split())

ANTONYM_PAIRS: tuple[tuple[str, str], ...] = (
    ("good", "bad"),
    ("good", "evil"),
    ("better", "worse"),
    ("best", "worst"),
    ("great", "terrible"),
    ("great", "awful"),
    ("excellent", "poor"),
    ("excellent", "terrible"),
    ("love", "hate"),
    ("loved", "hated"),
    ("loves", "hates"),
    ("loving", "hating"),
    ("like", "dislike"),
    ("liked", "disliked"),
    ("likes", "dislikes"),
    ("happy", "sad"),
    ("happy", "unhappy"),
    ("happiness", "sadness"),
    ("glad", "sorry"),
    ("beautiful", "ugly"),
    ("pretty", "ugly"),
    ("nice", "nasty"),
    ("nice", "mean"),
    ("kind", "cruel"),
    ("friendly", "hostile"),
    ("fun", "boring"),
    ("interesting", "boring"),
    ("exciting", "boring"),
    ("exciting", "dull"),
    ("win", "lose"),
    ("won", "lost"),
    ("wins", "loses"),
    ("winner", "loser"),
    ("winning", "losing"),
    ("success", "failure"),
    ("succeed", "fail"),
    ("succeeded", "failed"),
    ("right", "wrong"),
    ("correct", "incorrect"),
    ("positive", "negative"),
    ("pros", "cons"),
    ("pro", "con"),
    ("for", "against"),
    ("agree", "disagree"),
    ("accept", "reject"),
    ("accepted", "rejected"),
    ("approve", "disapprove"),
    ("always", "never"),
    ("everything", "nothing"),
    ("everyone", "nobody"),
    ("all", "none"),
    ("yes", "no"),
    ("easy", "hard"),
    ("easy", "difficult"),
    ("fast", "slow"),
    ("early", "late"),
    ("cheap", "expensive"),
    ("clean", "dirty"),
    ("safe", "dangerous"),
    ("strong", "weak"),
    ("smart", "stupid"),
    ("clever", "dumb"),
    ("wise", "foolish"),
    ("honest", "dishonest"),
    ("fair", "unfair"),
    ("polite", "rude"),
    ("calm", "angry"),
    ("brave", "afraid"),
    ("rich", "poor"),
    ("healthy", "sick"),
    ("fresh", "stale"),
    ("hot", "cold"),
    ("warm", "cold"),
    ("light", "dark"),
    ("up", "down"),
    ("high", "low"),
    ("more", "less"),
    ("most", "least"),
    ("increase", "decrease"),
    ("improve", "worsen"),
    ("improved", "worsened"),
    ("best", "worse"),
    ("perfect", "flawed"),
    ("perfect", "imperfect"),
    ("useful", "useless"),
    ("helpful", "unhelpful"),
    ("reliable", "unreliable"),
    ("pleasant", "unpleasant"),
    ("comfortable", "uncomfortable"),
    ("satisfied", "dissatisfied"),
    ("lucky", "unlucky"),
    ("fortunate", "unfortunate"),
    ("fortunately", "unfortunately"),
    ("hope", "despair"),
    ("hopeful", "hopeless"),
    ("smile", "frown"),
    ("laugh", "cry"),
    ("laughing", "crying"),
    ("joy", "sorrow"),
    ("praise", "criticize"),
    ("superior", "inferior"),
    ("above", "below"),
    ("on", "off"),
    ("open", "closed"),
    ("alive", "dead"),
    ("friend", "enemy"),
    ("legal", "illegal"),
    ("possible", "impossible"),
    ("able", "unable"),
    ("can", "cannot"),
    ("will", "wont"),
)

# NLTK's VADER negation words (nltk.sentiment.vader.VaderConstants.NEGATE), used when NLTK is missing.
_NEGATORS_FALLBACK = frozenset(
    """
aint arent cannot cant couldnt darent didnt doesnt dont hadnt hasnt havent isnt mightnt mustnt neednt neither
never none nope nor not nothing nowhere oughtnt shant shouldnt uhuh wasnt werent without wont wouldnt no
""".split()
) | {
    "ain't",
    "aren't",
    "can't",
    "couldn't",
    "daren't",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hasn't",
    "haven't",
    "isn't",
    "mightn't",
    "mustn't",
    "needn't",
    "oughtn't",
    "shan't",
    "shouldn't",
    "wasn't",
    "weren't",
    "won't",
    "wouldn't",
    "uh-uh",
}

VADER_MIN_VALENCE = 1.0


def _norm(word: str) -> str:
    return word.strip().lower().replace("\u2019", "'")


@functools.lru_cache(maxsize=1)
def negators() -> frozenset[str]:
    try:
        from nltk.sentiment.vader import VaderConstants

        return frozenset(_norm(w) for w in VaderConstants.NEGATE) | {"no"}
    except Exception:  # pragma: no cover - nltk is a TextAttack dependency
        return _NEGATORS_FALLBACK


def read_vader_lexicon(path: Path, min_valence: float = VADER_MIN_VALENCE) -> dict[str, int]:
    """Polarity (+1 / -1) of the alphabetic words of a VADER lexicon file (`word<TAB>mean<TAB>sd<TAB>ratings`)
    whose mean valence is at least `min_valence` in absolute value."""
    out: dict[str, int] = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        word = _norm(parts[0])
        try:
            mean = float(parts[1])
        except ValueError:
            continue
        if word.replace("'", "").isalpha() and abs(mean) >= min_valence:
            out[word] = 1 if mean > 0 else -1
    return out


def _vader_lexicon_file() -> Path | None:
    try:
        spec = importlib.util.find_spec("vaderSentiment")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"
    return path if path.exists() else None


@functools.lru_cache(maxsize=1)
def polarity_lexicon() -> tuple[dict[str, int], str]:
    """(word -> +1 / -1, description of the sources)."""
    lex: dict[str, int] = {}
    source = f"curated ({len(POSITIVE)} positive, {len(NEGATIVE)} negative words)"
    vader = _vader_lexicon_file()
    if vader is not None:
        extra = read_vader_lexicon(vader)
        lex.update(extra)
        source += f" + VADER lexicon ({len(extra)} words with |valence| >= {VADER_MIN_VALENCE})"
    # curated words win over VADER where they disagree
    lex.update({w: 1 for w in POSITIVE})
    lex.update({w: -1 for w in NEGATIVE})
    return lex, source


@functools.lru_cache(maxsize=1)
def _antonyms() -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    for a, b in ANTONYM_PAIRS:
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set()).add(a)
    return {k: frozenset(v) for k, v in out.items()}


def swap_conflict(original: str, replacement: str) -> str | None:
    """Why swapping `original` for `replacement` may change a sentiment label (None when it does not):
    'antonym', 'opposite polarity' or 'negation'."""
    a, b = _norm(original), _norm(replacement)
    if a == b:
        return None
    if b in _antonyms().get(a, ()):
        return "antonym"
    lex, _ = polarity_lexicon()
    pa, pb = lex.get(a, 0), lex.get(b, 0)
    if pa * pb < 0:
        return "opposite polarity"
    neg = negators()
    if (a in neg) != (b in neg):
        return "negation"
    return None
