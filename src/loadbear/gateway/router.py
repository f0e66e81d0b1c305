"""Routing by complexity: ``model: "auto"`` → a tier (``simple`` / ``complex``) → a model → its chain.

Two classifiers, one interface (``classify(messages, grounded) -> Classification``):

* :func:`classify_rules` (the default) — explainable rules over the request: its length, the
  number of questions, code (present, or asked for), reasoning and comparison cues, a
  multi-part ask, conversation depth, and whether the answer is grounded in retrieved
  sources. Each signal adds points; ``score >= RULE_THRESHOLD`` means ``complex``. The reason
  names every signal that counted, e.g. ``complex (score 3 ≥ 2): code in the request (+2),
  reasoning cue 'why' (+1)``.
* :class:`LearnedClassifier` — multinomial logistic regression in numpy over the MiniLM
  embedding of the request plus the rule features (standardised), trained from labelled
  ``{text, tier}`` examples (``loadbear router train``) and saved as a small JSON file, loaded
  through ``router_model_path`` (setting) / ``LOADBEAR_ROUTER_MODEL_PATH``.

Then the tier becomes a model (:meth:`Router.route`): the tenant's ``pinned_model`` wins over
any classification; models of the tenant's ``forbidden_tiers`` or outside ``allowed_models``
are never picked; if the wanted tier has no usable model, the nearest usable tier is used and
the reason says so. Inside a tier the tenant's default model, else the catalog default, else
the cheapest model of the tier is picked. Tiers are ranked by price (the cheapest model of
each), the ``local`` extractive tier is not a routing target.

The savings ledger (:meth:`Router.savings_micro_usd`): what the request would have cost at the
strong tier's model (the one ``complex`` routes to) minus what it cost, never negative.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from loadbear.providers.base import ModelConfig, Usage
from loadbear.providers.tokens import content_text, count_text

__all__ = [
    "COMPLEX",
    "SIMPLE",
    "RULE_THRESHOLD",
    "Classification",
    "LearnedClassifier",
    "RouteDecision",
    "Router",
    "RouterError",
    "choose",
    "classify_rules",
    "extract_features",
    "load_examples",
    "model_allowed",
]

SIMPLE, COMPLEX = "simple", "complex"
# Points at which the rules call a request complex.
RULE_THRESHOLD = 2
# Tiers that routing never targets (the extractive "local" model answers from sources only).
NON_ROUTABLE_TIERS = frozenset({"local"})
ROUTER_MODEL_ENV = "LOADBEAR_ROUTER_MODEL_PATH"
MODEL_FORMAT = "loadbear-router/1"
# Text the classifiers look at: the last user message, cut here (MiniLM reads 256 word pieces).
MAX_TEXT_CHARS = 8000


class RouterError(ValueError):
    """A router model or training set that cannot be used."""


# -- features and the rule classifier ---------------------------------------------------------

# The cues are matched on the request's lower-cased words (one regex pass) and phrases (C
# substring search): a few dozen case-insensitive regex searches would cost ~1 ms a request.
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_QUESTIONS = re.compile(r"\?+")
_JAVA_FRAME = re.compile(r"\n\s+at [\w.$<>]+\(")
# (label, words, phrases): a cue counts when any word is in the text, or any phrase.
_REASONING: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("why", frozenset({"why"}), ()),
    ("explain", frozenset({"explain", "explains", "explaining", "explanation"}), ()),
    ("step by step", frozenset({"step-by-step"}), ("step by step",)),
    ("prove", frozenset({"prove", "proof", "derive", "derivation"}), ()),
    ("analyse", frozenset({"analyse", "analyze", "analysis", "analysing", "analyzing"}), ()),
    ("reasoning", frozenset({"reason", "reasoning"}), ()),
    ("trade-offs", frozenset({"tradeoff", "tradeoffs", "trade-off", "trade-offs"}), ("trade off",)),
    ("evaluate", frozenset({"evaluate", "assess", "critique", "justify"}), ()),
    ("design", frozenset({"design", "architecture", "architect", "strategy", "roadmap"}), ()),
    ("plan", frozenset({"plan", "planning"}), ()),
    ("calculate", frozenset({"calculate", "compute", "estimate", "solve"}), ()),
    ("implications", frozenset({"implication", "implications", "consequence", "consequences"}), ("impact of",)),
    ("in depth", frozenset({"detailed", "thorough", "thoroughly", "in-depth"}), ("in depth", "in detail")),
)
_COMPARISON: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("compare", frozenset({"compare", "comparison", "comparing", "contrast"}), ()),
    ("versus", frozenset({"versus", "vs"}), ()),
    ("difference between", frozenset(), ("difference between", "differences between")),
    ("pros and cons", frozenset(), ("pros and cons", "advantages and disadvantages")),
    ("which is better", frozenset(), ("which is better", "which one is better", "better than", "best option",
                                      "should i use", "should i choose", "should i pick")),
)
_CODE_VERBS = frozenset({"write", "implement", "refactor", "debug", "fix", "optimise", "optimize", "port",
                         "convert", "generate"})
_CODE_NOUNS = frozenset({"code", "function", "class", "script", "program", "query", "regex", "regexp", "sql",
                         "method", "module", "test", "tests", "bug", "api", "endpoint"})
# Lines that start like code (case-sensitive: "Let me know" is prose, "let x = 1" is not).
_CODE_LINE_STARTS = ("def ", "class ", "import ", "from ", "function ", "function(", "const ", "let ", "var ",
                     "public ", "private ", "static ", "#include", "package ", "fn ", "func ", "return ",
                     "SELECT ", "INSERT ", "UPDATE ", "DELETE ", "CREATE TABLE", "if (", "for (", "while (", "}")
_CODE_MARKS = ("=>", "::", "self.", "this.", "</", "/>", "();", "){", ") {", "!==", "===", " != ", " == ")
_SIMPLE_TASK = re.compile(
    r"\s*(translate|summari[sz]e|rephrase|reword|paraphrase|correct|fix the (typo|spelling|grammar)|"
    r"define|what is|what's|who is|who was|when (is|was|did)|where (is|was)|how do i (reset|change|cancel|find))\b",
    re.I,
)


# Phrases padded with spaces, to match whole words of " ".join(words).
_REASONING = tuple((label, ws, tuple(f" {p} " for p in ps)) for label, ws, ps in _REASONING)
_COMPARISON = tuple((label, ws, tuple(f" {p} " for p in ps)) for label, ws, ps in _COMPARISON)


def _cues(table, words: set[str], joined: str) -> list[str]:
    return [label for label, ws, phrases in table
            if (ws and not ws.isdisjoint(words)) or any(p in joined for p in phrases)]


def _code_block(text: str, lines: list[str]) -> bool:
    if "```" in text or "~~~" in text or "Traceback (most recent call last)" in text or _JAVA_FRAME.search(text):
        return True
    signals = 0
    for line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(_CODE_LINE_STARTS) or stripped.endswith((";", "{")):
            signals += 1
            if signals >= 2:
                return True
    return signals + sum(1 for m in _CODE_MARKS if m in text) >= 2


def _code_request(word_list: list[str]) -> bool:
    for i, w in enumerate(word_list):
        if w in _CODE_VERBS and not _CODE_NOUNS.isdisjoint(word_list[i + 1:i + 9]):
            return True
    return False


def _list_items(lines: list[str]) -> int:
    n = 0
    for line in lines:
        s = line.lstrip()
        if s[:2] in ("- ", "* ", "• "):
            n += 1
        elif s[:1].isdigit():
            head = s[:4]
            for j, ch in enumerate(head):
                if not ch.isdigit():
                    if ch in ".)" and s[j + 1:j + 2] == " ":
                        n += 1
                    break
    return n


FEATURE_NAMES = (
    "tokens", "questions", "code_block", "code_request", "reasoning_cues", "comparison_cues",
    "parts", "turns", "conversation_chars", "grounded", "simple_task",
)


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return content_text(m.get("content"))[:MAX_TEXT_CHARS]
    return content_text(messages[-1].get("content"))[:MAX_TEXT_CHARS] if messages else ""


def extract_features(messages: Sequence[Mapping[str, Any]], grounded: bool = False,
                     text: str | None = None) -> dict[str, Any]:
    """The signals the rules (and the learned model) look at. ``text`` overrides the last user
    message (training examples are plain texts). Every value is a JSON number."""
    text = last_user_text(messages) if text is None else text[:MAX_TEXT_CHARS]
    word_list = _WORD.findall(text.lower())
    words = set(word_list)
    joined = " " + " ".join(word_list) + " "
    lines = text.splitlines()
    reasoning = _cues(_REASONING, words, joined)
    comparison = _cues(_COMPARISON, words, joined)
    turns = sum(1 for m in messages if m.get("role") == "user") or 1
    conv_chars = sum(len(content_text(m.get("content"))) for m in messages) if messages else len(text)
    return {
        "tokens": count_text(text),
        "questions": len(_QUESTIONS.findall(text)),
        "code_block": int(_code_block(text, lines)),
        "code_request": int(_code_request(word_list)),
        "reasoning_cues": len(reasoning),
        "comparison_cues": len(comparison),
        "parts": _list_items(lines),
        "turns": turns,
        "conversation_chars": conv_chars,
        "grounded": int(bool(grounded)),
        "simple_task": int(bool(_SIMPLE_TASK.match(text))),
        # Which cues matched, for the reason (not model inputs).
        "_reasoning": reasoning,
        "_comparison": comparison,
    }


def rule_points(f: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(points, why) for every signal that counted, in a fixed order."""
    pts: list[tuple[int, str]] = []
    tokens = f["tokens"]
    if tokens >= 500:
        pts.append((2, f"long request ({tokens} tokens)"))
    elif tokens >= 150:
        pts.append((1, f"longer request ({tokens} tokens)"))
    if f["code_block"]:
        pts.append((2, "code in the request"))
    elif f["code_request"]:
        pts.append((2, "asks for code"))
    q = f["questions"]
    if q >= 3:
        pts.append((2, f"{q} questions"))
    elif q == 2:
        pts.append((1, "2 questions"))
    reasoning = f.get("_reasoning") or []
    if reasoning:
        cues = ", ".join(f"'{c}'" for c in reasoning[:3])
        pts.append((min(2, len(reasoning)), f"reasoning cue{'s' if len(reasoning) > 1 else ''} {cues}"))
    comparison = f.get("_comparison") or []
    if comparison:
        pts.append((2, f"comparison ('{comparison[0]}')"))
    if f["parts"] >= 3:
        pts.append((1, f"{f['parts']}-part request"))
    if f["turns"] >= 6:
        pts.append((1, f"deep conversation ({f['turns']} user turns)"))
    elif f["conversation_chars"] >= 12_000:
        pts.append((1, "long conversation"))
    if f["simple_task"] and q <= 1 and not (f["code_block"] or f["code_request"] or reasoning or comparison):
        pts.append((-1, "routine task (lookup, translation, summary...)"))
    if f["grounded"] and not (f["code_block"] or f["code_request"]):
        pts.append((-1, "grounded in retrieved sources"))
    return pts


@dataclass
class Classification:
    tier: str
    reason: str
    features: dict[str, Any]
    score: float | None = None
    confidence: float | None = None
    classifier: str = "rules"

    def public_features(self) -> dict[str, Any]:
        return {k: v for k, v in self.features.items() if not k.startswith("_")}


def classify_rules(messages: Sequence[Mapping[str, Any]], grounded: bool = False, *,
                   text: str | None = None, threshold: int = RULE_THRESHOLD) -> Classification:
    f = extract_features(messages, grounded, text)
    pts = rule_points(f)
    score = sum(p for p, _ in pts)
    tier = COMPLEX if score >= threshold else SIMPLE
    cmp = "≥" if tier == COMPLEX else "<"
    if pts:
        why = ", ".join(f"{w} ({'+' if p > 0 else ''}{p})" for p, w in pts)
    else:
        why = f"short request ({f['tokens']} tokens), no code, reasoning or comparison cues"
    return Classification(tier, f"{tier} (score {score} {cmp} {threshold}): {why}", f, float(score), None, "rules")


# -- the learned classifier -------------------------------------------------------------------


def _feature_row(f: Mapping[str, Any]) -> list[float]:
    score = sum(p for p, _ in rule_points(f))
    return [
        math.log1p(f["tokens"]), float(f["questions"]), float(f["code_block"]), float(f["code_request"]),
        float(f["reasoning_cues"]), float(f["comparison_cues"]), float(min(f["parts"], 10)),
        math.log1p(f["turns"]), math.log1p(f["conversation_chars"]), float(f["grounded"]),
        float(f["simple_task"]), float(score),
    ]


LEARNED_FEATURES = (
    "log_tokens", "questions", "code_block", "code_request", "reasoning_cues", "comparison_cues",
    "parts", "log_turns", "log_conversation_chars", "grounded", "simple_task", "rule_score",
)


@dataclass
class Example:
    text: str
    tier: str
    grounded: bool = False


def load_examples(path: str | os.PathLike[str]) -> list[Example]:
    """Labelled examples from JSONL (one ``{"text": ..., "tier": ...}`` per line) or YAML (a list
    of the same, or ``{examples: [...]}``). ``grounded: true`` is optional."""
    p = Path(path)
    try:
        raw_text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RouterError(f"cannot read {p}: {exc.strerror or exc}") from None
    items: list[Any]
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(raw_text)
        except yaml.YAMLError as exc:
            raise RouterError(f"{p}: invalid YAML: {exc}") from None
        if isinstance(data, dict):
            data = data.get("examples")
        if not isinstance(data, list):
            raise RouterError(f"{p}: expected a list of {{text, tier}} (or examples: [...])")
        items = [(i + 1, d) for i, d in enumerate(data)]
    else:
        items = []
        for n, line in enumerate(raw_text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                items.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise RouterError(f"{p}:{n}: invalid JSON: {exc.msg}") from None
    out: list[Example] = []
    for n, d in items:
        if not isinstance(d, dict):
            raise RouterError(f"{p}:{n}: expected an object with 'text' and 'tier'")
        text, tier = d.get("text"), d.get("tier")
        if not isinstance(text, str) or not text.strip():
            raise RouterError(f"{p}:{n}: 'text' must be a non-empty string")
        if not isinstance(tier, str) or not tier.strip():
            raise RouterError(f"{p}:{n}: 'tier' must be a tier name, e.g. \"simple\" or \"complex\"")
        out.append(Example(text, tier.strip(), bool(d.get("grounded", False))))
    if not out:
        raise RouterError(f"{p}: no examples")
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class LearnedClassifier:
    """Softmax regression over ``[MiniLM embedding | standardised rule features]``.

    ``embedder`` is anything with ``embed(texts) -> (n, dim) array`` (default: the embedded
    all-MiniLM-L6-v2, loaded on first use). The saved JSON holds tiers, weights, bias, the
    feature standardisation and a few training facts.
    """

    classifier = "learned"

    def __init__(self, tiers: list[str], weights: np.ndarray, bias: np.ndarray, mean: np.ndarray,
                 std: np.ndarray, *, embedder_name: str = "all-MiniLM-L6-v2", embedder: Any = None,
                 meta: dict[str, Any] | None = None, path: str | None = None) -> None:
        self.tiers = list(tiers)
        self.W = np.asarray(weights, dtype=np.float32)
        self.b = np.asarray(bias, dtype=np.float32)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.embedder_name = embedder_name
        self._embedder = embedder
        self.meta = dict(meta or {})
        self.path = path
        if self.W.shape != (self.b.shape[0], self.W.shape[1]) or self.W.shape[0] != len(self.tiers):
            raise RouterError("router model: weights do not match the tiers")
        if self.mean.shape != (len(LEARNED_FEATURES),) or self.std.shape != self.mean.shape:
            raise RouterError("router model: feature statistics do not match this version of loadbear")

    # -- plumbing

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from loadbear.knowledge.embeddings import get_embedder

            self._embedder = get_embedder(self.embedder_name)
        return self._embedder

    @staticmethod
    def _inputs(embeddings: np.ndarray, feats: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return np.hstack([np.asarray(embeddings, dtype=np.float32), (feats - mean) / std]).astype(np.float32)

    # -- training

    @classmethod
    def train(cls, examples: Sequence[Example], embedder: Any = None, *, epochs: int = 400, lr: float = 0.05,
              l2: float = 1e-2, seed: int = 0) -> "LearnedClassifier":
        if len(examples) < 2:
            raise RouterError("training needs at least 2 examples")
        tiers = sorted({e.tier for e in examples})
        if len(tiers) < 2:
            raise RouterError(f"training needs examples of at least 2 tiers, got only {tiers[0]!r}")
        if embedder is None:
            from loadbear.knowledge.embeddings import get_embedder

            embedder = get_embedder()
        texts = [e.text[:MAX_TEXT_CHARS] for e in examples]
        emb = np.asarray(embedder.embed(texts), dtype=np.float32)
        feats = np.array([_feature_row(extract_features([], e.grounded, e.text)) for e in examples], dtype=np.float32)
        mean = feats.mean(axis=0)
        std = feats.std(axis=0)
        std[std < 1e-6] = 1.0
        X = cls._inputs(emb, feats, mean, std)
        y = np.array([tiers.index(e.tier) for e in examples])
        Y = np.eye(len(tiers), dtype=np.float32)[y]
        # Balanced classes: each tier weighs the same in the loss, whatever its count.
        counts = Y.sum(axis=0)
        sample_w = (len(y) / (len(tiers) * counts))[y].astype(np.float32)[:, None]
        rng = np.random.default_rng(seed)
        W = (rng.standard_normal((len(tiers), X.shape[1])) * 0.01).astype(np.float32)
        b = np.zeros(len(tiers), dtype=np.float32)
        # Adam, full batch: a few hundred steps over at most a few thousand rows.
        mW, vW, mb, vb = np.zeros_like(W), np.zeros_like(W), np.zeros_like(b), np.zeros_like(b)
        b1, b2, eps = 0.9, 0.999, 1e-8
        n = float(len(y))
        for t in range(1, epochs + 1):
            P = _softmax(X @ W.T + b)
            G = (P - Y) * sample_w / n
            gW = G.T @ X + l2 * W
            gb = G.sum(axis=0)
            mW = b1 * mW + (1 - b1) * gW
            vW = b2 * vW + (1 - b2) * gW * gW
            mb = b1 * mb + (1 - b1) * gb
            vb = b2 * vb + (1 - b2) * gb * gb
            W -= lr * (mW / (1 - b1 ** t)) / (np.sqrt(vW / (1 - b2 ** t)) + eps)
            b -= lr * (mb / (1 - b1 ** t)) / (np.sqrt(vb / (1 - b2 ** t)) + eps)
        P = _softmax(X @ W.T + b)
        accuracy = float((P.argmax(axis=1) == y).mean())
        meta = {"examples": len(examples), "per_tier": {t: int(c) for t, c in zip(tiers, counts)},
                "train_accuracy": round(accuracy, 4), "epochs": epochs, "l2": l2,
                "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        name = getattr(embedder, "name", "all-MiniLM-L6-v2")
        return cls(tiers, W, b, mean, std, embedder_name=name, embedder=embedder, meta=meta)

    # -- prediction

    def predict_proba(self, texts: Sequence[str], features: Sequence[Mapping[str, Any]]) -> np.ndarray:
        emb = np.asarray(self.embedder.embed([t[:MAX_TEXT_CHARS] or " " for t in texts]), dtype=np.float32)
        feats = np.array([_feature_row(f) for f in features], dtype=np.float32)
        return _softmax(self._inputs(emb, feats, self.mean, self.std) @ self.W.T + self.b)

    def predict(self, texts: Sequence[str], grounded: bool = False) -> list[str]:
        feats = [extract_features([], grounded, t) for t in texts]
        return [self.tiers[i] for i in self.predict_proba(texts, feats).argmax(axis=1)]

    def classify(self, messages: Sequence[Mapping[str, Any]], grounded: bool = False, *,
                 text: str | None = None) -> Classification:
        text = last_user_text(messages) if text is None else text
        f = extract_features(messages, grounded, text)
        p = self.predict_proba([text], [f])[0]
        i = int(p.argmax())
        tier, conf = self.tiers[i], float(p[i])
        signals = [w for pts, w in rule_points(f) if pts > 0][:3]
        name = Path(self.path).name if self.path else "in memory"
        why = f"{tier} (learned model {name}, p={conf:.2f})"
        if signals:
            why += "; signals: " + ", ".join(signals)
        return Classification(tier, why, f, None, round(conf, 4), "learned")

    # -- persistence

    def to_dict(self) -> dict[str, Any]:
        def r(a: np.ndarray) -> Any:
            return np.round(a.astype(np.float64), 6).tolist()

        return {"format": MODEL_FORMAT, "kind": "logistic_regression", "embedder": self.embedder_name,
                "tiers": self.tiers, "features": list(LEARNED_FEATURES), "feature_mean": r(self.mean),
                "feature_std": r(self.std), "weights": r(self.W), "bias": r(self.b), "meta": self.meta}

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, p)
        self.path = str(p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str], embedder: Any = None) -> "LearnedClassifier":
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise RouterError(f"cannot read router model {p}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise RouterError(f"router model {p} is not valid JSON: {exc.msg}") from None
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise RouterError(f"{p} is not a loadbear router model (format {MODEL_FORMAT!r})")
        if data.get("features") != list(LEARNED_FEATURES):
            raise RouterError(f"{p} was trained with other features; retrain it with 'loadbear router train'")
        try:
            return cls(data["tiers"], np.array(data["weights"]), np.array(data["bias"]),
                       np.array(data["feature_mean"]), np.array(data["feature_std"]),
                       embedder_name=data.get("embedder") or "all-MiniLM-L6-v2", embedder=embedder,
                       meta=data.get("meta"), path=str(p))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, RouterError):
                raise
            raise RouterError(f"router model {p} is incomplete or damaged: {exc}") from None


# -- tier → model -----------------------------------------------------------------------------


def model_allowed(settings: Any, model: ModelConfig) -> bool:
    """The tenant may use this model: in its allow-list and not in a forbidden tier."""
    return settings.allows(model.name) and model.tier not in (getattr(settings, "forbidden_tiers", None) or ())


def _price(m: ModelConfig) -> float:
    return float(m.input_price) + float(m.output_price)


@dataclass
class RouteDecision:
    model: str
    tier: str
    reason: str
    classification: Classification | None = None
    pinned: bool = False

    def __iter__(self):  # model, tier, reason = decision
        return iter((self.model, self.tier, self.reason))

    def ledger_metadata(self) -> dict[str, Any]:
        """For ``InteractionRecord.metadata["route"]``."""
        out: dict[str, Any] = {"tier": self.tier, "model": self.model, "pinned": self.pinned}
        c = self.classification
        if c is not None:
            out.update(classifier=c.classifier, classified_tier=c.tier, features=c.public_features())
            if c.score is not None:
                out["score"] = c.score
            if c.confidence is not None:
                out["confidence"] = c.confidence
        return out


class Router:
    """Classifier + catalog/tenant rules. One per gateway; stateless per request."""

    def __init__(self, classifier: LearnedClassifier | None = None) -> None:
        self.learned = classifier

    @classmethod
    def from_settings(cls, settings: Any = None) -> "Router":
        path = getattr(settings, "router_model_path", None) or os.environ.get(ROUTER_MODEL_ENV) or None
        return cls(LearnedClassifier.load(path) if path else None)

    @property
    def kind(self) -> str:
        return "learned" if self.learned is not None else "rules"

    # -- classification

    def classify(self, messages: Sequence[Mapping[str, Any]], grounded: bool = False) -> Classification:
        if self.learned is not None:
            return self.learned.classify(messages, grounded)
        return classify_rules(messages, grounded)

    # -- tiers and models of a tenant

    def usable(self, catalog: Iterable[ModelConfig], settings: Any) -> list[ModelConfig]:
        return [m for m in catalog if m.tier not in NON_ROUTABLE_TIERS and model_allowed(settings, m)]

    def tier_ranking(self, catalog: Iterable[ModelConfig], settings: Any) -> list[str]:
        """The tenant's routable tiers, cheapest first (by the cheapest model of each)."""
        best: dict[str, float] = {}
        for m in self.usable(catalog, settings):
            best[m.tier] = min(best.get(m.tier, math.inf), _price(m))
        return sorted(best, key=lambda t: (best[t], t))

    def pick(self, catalog: Any, settings: Any, tier: str) -> ModelConfig | None:
        """The model a tier routes to: the tenant default, the catalog default, else the cheapest."""
        models = [m for m in self.usable(catalog, settings) if m.tier == tier]
        if not models:
            return None
        names = {m.name: m for m in models}
        for preferred in (getattr(settings, "default_model", None), getattr(catalog, "default_model", None)):
            if preferred in names:
                return names[preferred]
        return min(models, key=lambda m: (_price(m), m.name))

    def strong_model(self, catalog: Any, settings: Any) -> ModelConfig | None:
        """What ``complex`` routes to for this tenant (else its priciest tier): the savings baseline."""
        m = self.pick(catalog, settings, COMPLEX)
        if m is None:
            ranking = self.tier_ranking(catalog, settings)
            m = self.pick(catalog, settings, ranking[-1]) if ranking else None
        return m

    def tenant_chain(self, catalog: Any, settings: Any, name: str) -> list[ModelConfig]:
        """``name`` and its fallbacks (tenant overrides applied), without models the tenant may not use."""
        return [m for m in catalog.chain(name, getattr(settings, "fallback_overrides", None) or None)
                if model_allowed(settings, m)]

    def downgrade_chain(self, catalog: Any, settings: Any, chain: Sequence[ModelConfig]) -> list[ModelConfig] | None:
        """The chain of the cheapest allowed tier, if that is cheaper than ``chain``'s first model."""
        ranking = self.tier_ranking(catalog, settings)
        if not ranking or not chain:
            return None
        target = self.pick(catalog, settings, ranking[0])
        if target is None or target.name == chain[0].name or _price(target) >= _price(chain[0]):
            return None
        return self.tenant_chain(catalog, settings, target.name) or None

    # -- the decision

    def route(self, catalog: Any, settings: Any, messages: Sequence[Mapping[str, Any]],
              grounded: bool = False) -> RouteDecision:
        notes: list[str] = []
        pinned = getattr(settings, "pinned_model", None)
        if pinned:
            m = catalog.get(pinned)
            if m is not None and model_allowed(settings, m):
                return RouteDecision(m.name, m.tier, f"pinned by tenant: {m.name}", None, True)
            notes.append(f"pinned model {pinned!r} is not available, routing instead")
        c = self.classify(messages, grounded)
        ranking = self.tier_ranking(catalog, settings)
        tier = c.tier
        if tier not in ranking:
            forbidden = tier in (getattr(settings, "forbidden_tiers", None) or ())
            if not ranking or not ({SIMPLE, COMPLEX} & set(ranking)):
                # No model carries a routing tier (e.g. only `local` and custom tiers): "auto"
                # keeps its plain meaning, the tenant's (or the catalog's) default model.
                fallback = getattr(settings, "default_model", None) or catalog.default_model
                m = catalog.get(fallback)
                why = "; ".join([*notes, c.reason, f"no routable model for this tenant, using {fallback}"])
                return RouteDecision(fallback, m.tier if m else tier, why, c)
            # Forbidden or missing: the nearest tier. Strong asks get the strongest left, others the cheapest.
            new = ranking[-1] if tier == COMPLEX else ranking[0]
            notes.append(f"tier '{tier}' is {'forbidden for this tenant' if forbidden else 'not in the catalog'}, "
                         f"using '{new}'")
            tier = new
        m = self.pick(catalog, settings, tier)
        assert m is not None  # tier came from the ranking of usable models
        reason = c.reason + "".join(f"; {n}" for n in notes) + f" → {m.name}"
        return RouteDecision(m.name, tier, reason, c)

    async def aroute(self, catalog: Any, settings: Any, messages: Sequence[Mapping[str, Any]],
                     grounded: bool = False) -> RouteDecision:
        """:meth:`route` off the event loop when the learned classifier has to embed the text."""
        if self.learned is None:
            return self.route(catalog, settings, messages, grounded)
        return await asyncio.to_thread(self.route, catalog, settings, messages, grounded)

    # -- savings

    def savings_micro_usd(self, catalog: Any, settings: Any, served: str | ModelConfig | None,
                          prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                          actual_cost_micro_usd: int | None = None) -> int:
        """Cost at the strong tier's model minus the actual cost (or the served model's), ≥ 0."""
        strong = self.strong_model(catalog, settings)
        if strong is None:
            return 0
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_tokens=cached_tokens)
        if actual_cost_micro_usd is None:
            m = catalog.get(served) if isinstance(served, str) else served
            if m is None:
                return 0
            actual_cost_micro_usd = m.cost_micro_usd(usage)
        return max(0, strong.cost_micro_usd(usage) - int(actual_cost_micro_usd))


_RULES_ROUTER = Router()


def choose(catalog: Any, tenant_settings: Any, messages: Sequence[Mapping[str, Any]], grounded: bool = False,
           router: Router | None = None) -> tuple[str, str, str]:
    """``(model_name, tier, reason)`` for a ``model: "auto"`` request."""
    d = (router or _RULES_ROUTER).route(catalog, tenant_settings, messages, grounded)
    return d.model, d.tier, d.reason
