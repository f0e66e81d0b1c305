"""Text side of the response cache: normalisation, lexical neighbourhood keys, the look-alike
guard and the static pre-filter embedding. Pure functions, no I/O (see :mod:`loadbear.gateway.cache`).

* :func:`normalize_exact` — the "normalised request" of the exact cache: NFKC, case-folded,
  whitespace collapsed, trailing ``?!.`` dropped. Nothing that can change meaning is removed.
* :func:`content_words` / :func:`question_keys` — candidate generation for the semantic cache
  without a vector scan. A question's *content set* is its lightly stemmed words minus function
  words (question words are kept: "why" and "when" ask different things). An entry is filed under
  its full set ("F" key) and, for sets of at least ``DROP_MIN`` words, under each set with one word
  left out ("D" keys); a lookup reads F(its set), F(its set minus a word) and D(its set), then a
  bounded number of rows of D(its set minus a word). So two questions meet when their sets are
  equal or differ by one inserted, deleted or substituted word. Salient words (names, numbers:
  see the guard) are never left out: a neighbour without them is a look-alike the guard would
  refuse, and those keys ("Any update on ticket #…" minus the number) are the ones thousands of
  entries share. The keys are 64-bit hashes that include the scope, in a B-tree: a lookup costs the
  same at 100 entries and at 100k. The semantic decision itself is still the embedding
  similarity; the keys only choose which entries are compared (the benchmark measures how many
  threshold-passing matches an exhaustive scan would add).
* :func:`guard` — refuses a semantic match between look-alike questions: every *salient* token of
  either (numbers and tokens with digits, capitalised words inside a sentence, acronyms, quoted
  spans, e-mails/URLs/identifiers) must occur in the other (case aside), both must carry the same
  negations and contrast-class words (enable/disable, this/last month, upgrade/downgrade, ...), and
  a word both put after a direction word must follow the same one ("from Team to Business" is not
  "from Business to Team", in any case). Embeddings score such pairs close ("charged twice this
  month" / "last month": MiniLM cosine 0.987) although their answers differ.
* :class:`StaticEmbedder` — a bag of all-MiniLM-L6-v2's own input word-piece vectors (Zipf-weighted
  by vocabulary rank, the vocabulary's mean removed): ~50 µs per question instead of MiniLM's
  several ms. It is only a gate in front of MiniLM: a candidate far below it is dropped without
  paying for the query's MiniLM embedding.
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "DROP_MIN",
    "MAX_KEY_WORDS",
    "StaticEmbedder",
    "content_words",
    "guard",
    "key64",
    "neighbour_signatures",
    "normalize_exact",
    "question_keys",
    "QuestionKeys",
    "salient_features",
]

# Sets of at least this many words also get their drop-one keys (smaller sets only their full key:
# a one-word difference between two-word questions is a different question).
DROP_MIN = 3
# At most this many content words take part in the keys (long prompts rarely paraphrase-match).
MAX_KEY_WORDS = 16

_WS = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([?.!,;:])")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*", re.UNICODE)

# Function words: not part of a question's content set. Question words are deliberately absent.
STOPWORDS = frozenset(
    """a an the and or but if then so of to in on at by for with from into onto about as than via per
    i me my mine myself we us our ours you your yours he him his she her it its they them their this that these those
    is are was were be been being am do does did doing done have has had having can could would should shall will
    may might must need please pls hi hello hey thanks thank there here just also any some all really
    get got getting possible able way there's it's i'm i've i'd let lets let's tell know want wanted like
    """.split()
)
_QUESTION_WORDS = frozenset("how what why when where who whom whose which".split())

# Negations: a question and its negation never share an answer.
_NEGATIONS = frozenset("not no never without cannot none nothing nobody nor neither".split())

# Contrast classes: the words of a question from these classes must be the same in both questions.
_CONTRAST = frozenset(
    """enable enabled disable disabled activate deactivate on off add added remove removed delete deleted
    create created upgrade upgraded downgrade downgraded increase decrease reduce raise lower higher more less fewer
    start stop pause paused resume cancel cancelled canceled import export upload download lock unlock
    subscribe unsubscribe archive unarchive restore allow block deny accept reject decline before after
    first last next previous current this today yesterday tomorrow daily weekly monthly annual annually yearly
    quarterly hourly minimum maximum min max public private send receive buy sell join leave share unshare
    show hide include exclude free paid old new open close closed in out up down early late earlier later
    """.split()
)
# Only these contrast words count when they stand next to nothing special (prepositions such as "in"
# or "on" are too common to compare alone): "on"/"off"/"in"/"out"/"up"/"down" count only right after
# a verb-like word, which the tokenizer cannot tell, so they are left to the embedding.
_WEAK_CONTRAST = frozenset("on in out up down".split())
# Capitalised inside a sentence, yet never a name.
_NEVER_SALIENT = frozenset("i thanks thank please hi hello hey cheers regards ok okay yes no sorry dear".split())
_DIRECTION = frozenset("from to into than vs versus over instead".split())
_ARTICLES = frozenset("a an the my our your their its this that".split())

_SALIENT_SPECIAL = re.compile(
    r"""(?P<url>https?://\S+|www\.\S+)
      |(?P<email>[\w.+-]+@[\w-]+\.[\w.-]+)
      |(?P<quoted>"[^"]{1,80}"|“[^”]{1,80}”|`[^`]{1,80}`|'[^'\s][^']{0,78}[^'\s]')
    """,
    re.VERBOSE,
)
_TOKEN = re.compile(r"[\w$€£%][\w$€£%.,:/#+@'’-]*", re.UNICODE)


def normalize_exact(text: str) -> str:
    """The exact cache's normal form: NFKC, case-folded, whitespace collapsed, no trailing ``?!.``."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = _WS.sub(" ", t).strip()
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    return t.rstrip("?!. ").strip()


def _stem(w: str) -> str:
    """A light, deterministic English suffix stripper (consistency matters here, not linguistics)."""
    if len(w) <= 3 or not w.isalpha():
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("sses"):
        return w[:-2]
    if w.endswith("ing") and len(w) > 5:
        w = w[:-3]
        return w[:-1] if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz" else w
    if w.endswith("ed") and len(w) > 4:
        w = w[:-2]
        return w[:-1] if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz" else w
    if w.endswith("es") and len(w) > 4 and w[-3] in "sxz":
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    return w[:-1] if len(w) > 4 and w.endswith("e") else w


_CONTRAST_STEMS = frozenset(_stem(w) for w in _CONTRAST - _WEAK_CONTRAST)


def _words(text: str) -> list[str]:
    t = unicodedata.normalize("NFKC", text).casefold().replace("’", "'")
    out: list[str] = []
    for w in _WORD.findall(t):
        if w.endswith("n't"):
            out.append(w[:-3] if w not in ("can't", "won't") else ("can" if w == "can't" else "will"))
            out.append("not")
        elif w.endswith("'s"):
            out.append(w[:-2])
        else:
            out.append(w)
    return out


def content_words(text: str) -> list[str]:
    """The question's content words: stemmed, function words removed, first occurrence order."""
    seen: dict[str, None] = {}
    for w in _words(text):
        if w in STOPWORDS and w not in _QUESTION_WORDS:
            continue
        seen.setdefault(_stem(w), None)
    return list(seen)


def key64(*parts: str) -> int:
    """A signed 64-bit key (fits BIGINT / SQLite INTEGER) of some strings."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big", signed=True)


def neighbour_signatures(words: Sequence[str], pinned: Iterable[str] = ()) -> list[str]:
    """The full content set and, for sets of at least DROP_MIN words, each set with one word left
    out, except pinned (salient) words: a neighbour without them is a look-alike the guard refuses."""
    full, drops = _sets(words, pinned)
    return ([full] if full else []) + drops


def _sets(words: Sequence[str], pinned: Iterable[str] = ()) -> tuple[str, list[str]]:
    ws = sorted(set(words[:MAX_KEY_WORDS]))
    if not ws:
        return "", []
    pin = set(pinned)
    drops = []
    if len(ws) >= DROP_MIN:
        drops = [" ".join(ws[:i] + ws[i + 1:]) for i in range(len(ws)) if ws[i] not in pin]
    return " ".join(ws), drops


@dataclass(frozen=True)
class QuestionKeys:
    """The neighbourhood keys of one question in one scope.

    ``entry``: what an entry is stored under — its full set ("F") and its drop-one sets ("D").
    ``probe``: what a lookup reads first — F(full) (same set), F(drop-one) (the entry lacks one of
    the question's words), D(full) (the entry has one word more). ``subst``: D(drop-one), entries
    that differ by one substituted word; these keys are the common ones (a short question minus a
    word), so a lookup reads a bounded number of their rows.
    """

    entry: tuple[int, ...]
    probe: tuple[int, ...]
    subst: tuple[int, ...]


def question_keys(scope: str, text: str) -> QuestionKeys:
    words = content_words(text)
    pinned = {_stem(w) for t in _features_cached(text)[0] for w in _WORD.findall(t.removeprefix("q:"))}
    full, drops = _sets(words, pinned)
    if not full:
        return QuestionKeys((), (), ())
    f_full, d_full = key64(scope, "F", full), key64(scope, "D", full)
    f_drops = [key64(scope, "F", d) for d in drops]
    d_drops = [key64(scope, "D", d) for d in drops]
    return QuestionKeys(entry=(f_full, *d_drops), probe=(f_full, *f_drops, d_full), subst=tuple(d_drops))


# -- the look-alike guard ----------------------------------------------------------------


def salient_features(text: str) -> tuple[dict[str, str], tuple[str, ...], frozenset[str], dict[str, str]]:
    """What two questions must share for one's answer to serve the other.

    Returns (salient, markers, words, directed): ``salient`` maps each salient token (case-folded)
    to the direction word before it ("from", "to", ... or ""); ``markers`` are the sorted negations
    and contrast-class words (stemmed); ``words`` every case-folded token, to check presence in;
    ``directed`` maps every word that follows a direction word (articles skipped) to it, whatever
    its case ("from the free plan to the team plan": free → from, team → to).
    """
    t = unicodedata.normalize("NFKC", text)
    salient: dict[str, str] = {}
    words: set[str] = set()
    for m in _SALIENT_SPECIAL.finditer(t):
        q = m.group(0).strip("\"'`“”").casefold()
        salient["q:" + q] = ""
        words.add("q:" + q)
    t = _SALIENT_SPECIAL.sub(" ", t)
    prev: list[str] = []  # case-folded previous tokens (for the direction tag)
    for match in _TOKEN.finditer(t):
        raw = match.group(0)
        tok = raw.rstrip(".,:;!?'’-")
        if not tok:
            continue
        j = match.start() - 1
        while j >= 0 and t[j] in " \t\"'“”‘’([*-":
            j -= 1
        sentence_start = j < 0 or t[j] in ".!?:\n;"
        low = _norm_entity(tok.casefold().replace("’", "'"))
        words.add(low)
        is_salient = False
        if any(ch.isdigit() for ch in tok):
            is_salient = True  # numbers, versions, dates, prices, sizes, ids
        elif len(tok) >= 2 and tok.isupper() and tok.isalpha():
            is_salient = True  # SSO, CSV, EU, API
        elif tok[0].isupper() and not sentence_start and low not in _NEVER_SALIENT and not low.startswith("i'"):
            is_salient = True  # a capitalised word inside a sentence: a name
        elif any(c in tok for c in "_@/#") or (any(c.isupper() for c in tok[1:]) and any(c.islower() for c in tok)):
            is_salient = True  # identifiers, paths, camelCase
        if is_salient:
            direction = ""
            for back, p in enumerate(reversed(prev[-3:])):
                if p in _DIRECTION:
                    if all(x in _ARTICLES for x in prev[len(prev) - back:]):
                        direction = p
                    break
            salient.setdefault(low, direction)
        prev.append(low)
    markers: list[str] = []
    directed: dict[str, str] = {}
    pending: str | None = None
    for w in _words(text):
        if w in _NEGATIONS:
            markers.append("not")
        else:
            st = _stem(w)
            if st in _CONTRAST_STEMS:
                markers.append(st)
        if w in _DIRECTION:
            pending = w
        elif pending is not None and w not in _ARTICLES:
            directed.setdefault(_stem(w), pending)
            pending = None
    return salient, tuple(sorted(markers)), frozenset(words), directed


def _norm_entity(low: str) -> str:
    if re.fullmatch(r"[\d,]+(\.\d+)?", low):
        return low.replace(",", "")
    return low[:-2] if low.endswith("'s") else low


_Features = tuple[dict[str, str], tuple[str, ...], frozenset[str], dict[str, str]]
_GUARD_CACHE: dict[str, _Features] = {}
_GUARD_LOCK = threading.Lock()


def _features_cached(text: str) -> _Features:
    f = _GUARD_CACHE.get(text)
    if f is None:
        f = salient_features(text)
        with _GUARD_LOCK:
            if len(_GUARD_CACHE) > 20_000:
                _GUARD_CACHE.clear()
            _GUARD_CACHE[text] = f
    return f


def guard(query: str, candidate: str) -> str | None:
    """None when the candidate's answer may serve the query as far as salient tokens go, else why not.

    Every salient token of either question must occur in the other (case aside: "Team" matches a
    lower-case "team"); when both tag it with a direction word, the tags must agree; and both must
    carry the same negations and contrast words; and a word both put after a direction word
    ("from", "to", "into", ...) must follow the same one in each.
    """
    qs, qm, qw, qd = _features_cached(query)
    cs, cm, cw, cd = _features_cached(candidate)
    if qm != cm:
        return "markers"
    for w, direction in qd.items():
        other = cd.get(w)
        if other is not None and other != direction:
            return "order"
    for sal, other_sal, other_words in ((qs, cs, cw), (cs, qs, qw)):
        for tok, direction in sal.items():
            if tok not in other_words:
                return "entities"
            other = other_sal.get(tok)
            if direction and other and other != direction:
                return "order"
    return None


# -- the static pre-filter embedding ------------------------------------------------------


class StaticEmbedder:
    """Bag-of-word-pieces vectors from all-MiniLM-L6-v2's input embedding table.

    ``vector = Σ log(1 + rank(t)) · (E[t] − mean(E))`` over the text's word pieces, L2-normalised.
    The BERT vocabulary is ordered by frequency from id 1996 ("the") on, so the weight is a Zipf
    down-weighting of common words; removing the mean takes out the direction every vector shares.
    Shares the tokenizer and the table with the loaded MiniLM (no copy); thread-safe.
    """

    name = "minilm-static-v1"
    FIRST_WORD_ID = 1996

    def __init__(self, tokenizer, table: np.ndarray) -> None:
        self.tokenizer = tokenizer
        self.table = table
        n = table.shape[0]
        ranks = np.maximum(np.arange(n, dtype=np.float32) - (self.FIRST_WORD_ID - 1), 1.0)
        self.weights = np.log1p(ranks).astype(np.float32)
        self.weights[: self.FIRST_WORD_ID] = 0.0  # [PAD], [unused*], [CLS], [SEP], [MASK], ...
        self.mean = table[self.FIRST_WORD_ID:].mean(axis=0).astype(np.float32)
        self.dim = int(table.shape[1])
        self.cache_size = 20_000
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_lock = threading.Lock()

    @classmethod
    def from_minilm(cls, embedder=None) -> "StaticEmbedder":
        from loadbear.knowledge.embeddings import MiniLMEmbedder

        e = (embedder or MiniLMEmbedder()).load()
        model = e._model  # the shared, immutable weights (tokenizer + word table)
        return cls(model.tokenizer, model.word)

    def embed_cached(self, texts: Sequence[str]) -> np.ndarray:
        """``embed``, remembering the vectors of the last ``cache_size`` texts (candidates recur)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing = []
        for i, t in enumerate(texts):
            v = self._memo.get(t)
            if v is None:
                missing.append(i)
            else:
                out[i] = v
        if missing:
            vecs = self.embed([texts[i] for i in missing])
            with self._memo_lock:
                for i, v in zip(missing, vecs):
                    out[i] = v
                    self._memo[texts[i]] = v
                    if len(self._memo) > self.cache_size:
                        self._memo.popitem(last=False)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # one text: encode() (encode_batch may hand even one text to the tokenizer's thread pool)
        encs = ([self.tokenizer.encode(texts[0], add_special_tokens=False)] if len(texts) == 1
                else self.tokenizer.encode_batch(texts, add_special_tokens=False))
        for i, enc in enumerate(encs):
            ids = np.asarray(enc.ids[:256], dtype=np.intp)
            if ids.size == 0:
                continue
            w = self.weights[ids]
            if not w.any():
                continue
            v = w @ self.table[ids] - w.sum() * self.mean
            norm = float(np.sqrt(v @ v))
            if norm > 0:
                out[i] = v / norm
        return out


def cosine_rows(q: np.ndarray, rows: Iterable[np.ndarray]) -> np.ndarray:
    rows = list(rows)
    if not rows:
        return np.zeros(0, dtype=np.float32)
    return np.stack(rows) @ q
