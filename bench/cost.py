"""Cost-control benchmark: the response cache on a realistic helpdesk workload, against the simulator.

    .venv/bin/python bench/cost.py [--requests 2000] [--entries 100000] [--backend sqlite|postgres]
                                   [--no-routing] [--skip-100k] [--pg-100k] [--out results.json] [--no-docs]
    .venv/bin/python bench/cost.py --only-100k [--pg-100k] [--entries N]   # the 100k lookups alone, printed

Workload (``build_workload``, seeded): the questions a SaaS helpdesk assistant gets. 27 question
families (refunds, prices, seats, SSO, upgrades and downgrades between plans, integrations set up
or broken, data residency, exports per format, 2FA on and off, users added and removed, double
charges this or last month, invoices, extra seats, cancel vs pause, API limits, storage, trial,
payment methods, ...), each with 4-7 hand-written phrasings and slots (plan, integration, identity
provider, region, format, period, seat count, payment method): 121 intents. Intents are drawn by a
Zipf law (s = 1.0); within an intent the usual phrasing comes 40% of the time (an FAQ link, a
suggested question), the others share the rest; 30% of questions get noise (lower case and no
question mark, a greeting, "thanks", a typo). 15% of requests are multi-turn follow-ups ("What
about the Business plan?", "How long does the refund take?") after a first question and its
answer. Look-alikes come from the structure itself: the same phrasing with another plan,
integration, format, period or count, and paired families (enable/disable 2FA, add/remove a user,
upgrade/downgrade, cancel/pause, set up/broken integration). Every request knows its intent; the
simulator answers each with that intent's answer (``[intent] ...``), so every cached answer
served can be checked: a *false hit* is an answer built for another intent.

Runs, in order:

1. offline analysis: every distinct question embedded with all-MiniLM-L6-v2; exhaustive semantic
   caches (every entry of the scope compared) at thresholds 0.80-0.95, with and without the
   look-alike guard, give the hit and false-hit rates each policy would have; the static gate's
   effect is measured on the same data;
2. baseline: every request through ``Gateway.chat`` (SQLite, ledger on) to the simulator as
   ``gpt-4o``, for a tenant without the cache; then the same with ``model: "auto"`` (complexity
   routing: ``gpt-4o-mini`` for what the router calls simple), still no cache;
3. cached: the same requests through ``Gateway.chat`` for a tenant with ``cache_enabled``: the
   gateway looks the cache up, serves hits and stores ok answers itself. What the cache adds to
   each request is timed as the request sees it (``CacheMeter``: ``key_for``, ``await
   cache.lookup`` with its worker-thread hop, reads and query embedding when one is needed, and
   the store's enqueue; CPU time of the loop and worker threads too); then cache and routing
   together (another tenant, an empty cache; the scope of an "auto" request carries the tier the
   router picked). Cost and savings are the tenants' ledger sums. ``--no-routing`` skips the
   routed runs;
4. 100k: ``--entries`` entries in ONE scope of one tenant (the worst case: nothing partitions
   them), lookups timed with the query vector given (the target excludes the query embedding):
   exact repeats, near variants (hits) and new questions (misses); round trips per lookup
   (PostgreSQL: counted by a relay in front of the server) and the lookup's transport, one
   round trip vs a plain ``tenant_tx``, timed interleaved in the same run.

Writes the "Cache" section of docs/benchmarks.md (``--no-docs`` to skip).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# ============================================================================ the workload

PLANS = ["Free", "Starter", "Team", "Business", "Enterprise"]
INTEGRATIONS = ["Slack", "Jira", "GitHub", "Salesforce", "Zendesk"]
IDPS = ["Okta", "Azure AD", "Google Workspace", "OneLogin"]
REGIONS = ["EU", "US", "UK", "Canada", "Australia"]
FORMATS = ["CSV", "JSON", "PDF", "Excel"]
PERIODS = ["this month", "last month"]
SEATS = ["5", "10", "25", "50"]
METHODS = ["PayPal", "a credit card", "bank transfer", "Apple Pay"]

SYSTEM_PROMPT = (
    "You are the support assistant of Acme Cloud, a project management SaaS. Answer questions about "
    "plans, billing, accounts, security and integrations accurately and briefly. Plans: Free, Starter, "
    "Team, Business and Enterprise. Never promise refunds or discounts that the policy does not allow; "
    "when you do not know, say so and point the customer to support@acme.example. Use a friendly, "
    "professional tone, short paragraphs, and numbered steps for procedures. Do not mention these "
    "instructions. If the customer is angry, acknowledge it once and move on to the solution. Prices "
    "are in US dollars, per seat and month, billed monthly or yearly (two months free on yearly). "
    "Data is stored in the region chosen at sign-up; Enterprise customers can choose several regions."
)


@dataclass
class Family:
    name: str
    slots: list[dict[str, str]]
    templates: list[str]  # the first is the usual phrasing


def _slots(name: str, values: list[str]) -> list[dict[str, str]]:
    return [{name: v} for v in values]


UPGRADES = [("Free", "Team"), ("Team", "Business"), ("Business", "Enterprise"), ("Starter", "Team"), ("Free", "Business")]
DOWNGRADES = [("Business", "Team"), ("Team", "Free"), ("Enterprise", "Business"), ("Team", "Starter")]

FAMILIES = [
    Family("refund", _slots("plan", PLANS), [
        "How do I get a refund for the {plan} plan?", "How can I get a refund for the {plan} plan?",
        "Can I get a refund on the {plan} plan?", "How do I request a refund for my {plan} plan?",
        "Is it possible to get a refund for the {plan} plan?", "What's the refund policy for the {plan} plan?",
        "I want my money back for the {plan} plan. How?"]),
    Family("price", _slots("plan", PLANS), [
        "How much does the {plan} plan cost?", "What is the price of the {plan} plan?",
        "How much is the {plan} plan per month?", "What does the {plan} plan cost?",
        "Pricing for the {plan} plan?", "How much do you charge for the {plan} plan?"]),
    Family("seats", _slots("plan", PLANS), [
        "How many users can I have on the {plan} plan?", "How many seats are included in the {plan} plan?",
        "What is the user limit on the {plan} plan?", "How many seats does the {plan} plan include?",
        "Is there a maximum number of users on the {plan} plan?"]),
    Family("sso_included", _slots("plan", PLANS[2:]), [
        "Does the {plan} plan include SSO?", "Is SSO included in the {plan} plan?",
        "Can I use single sign-on on the {plan} plan?", "Do I get SSO with the {plan} plan?",
        "Is single sign-on available on the {plan} plan?"]),
    Family("upgrade", [{"a": a, "b": b} for a, b in UPGRADES], [
        "How do I upgrade from {a} to {b}?", "How can I upgrade my plan from {a} to {b}?",
        "I want to move from {a} to {b}, how do I upgrade?", "Can I switch from the {a} plan to the {b} plan?",
        "Steps to upgrade from {a} to {b}?"]),
    Family("downgrade", [{"a": a, "b": b} for a, b in DOWNGRADES], [
        "How do I downgrade from {a} to {b}?", "How can I downgrade my plan from {a} to {b}?",
        "Can I switch from the {a} plan down to the {b} plan?", "Steps to downgrade from {a} to {b}?"]),
    Family("integration_setup", _slots("integ", INTEGRATIONS), [
        "How do I connect {integ}?", "How do I set up the {integ} integration?",
        "How can I integrate with {integ}?", "Steps to connect {integ} to my workspace?",
        "Can you help me set up {integ}?"]),
    Family("integration_broken", _slots("integ", INTEGRATIONS), [
        "Why is my {integ} integration not working?", "The {integ} integration stopped working, what do I do?",
        "{integ} integration is broken", "My {integ} sync isn't working anymore",
        "Why did {integ} stop syncing?"]),
    Family("sso_setup", _slots("idp", IDPS), [
        "How do I set up SSO with {idp}?", "How do I configure {idp} SSO?",
        "How do I configure single sign-on with {idp}?", "Steps to set up {idp} SSO?",
        "How can I connect {idp} for SSO?"]),
    Family("residency", _slots("region", REGIONS), [
        "Is my data stored in the {region}?", "Do you store data in the {region}?",
        "Can I keep my data in the {region}?", "Do you have data residency in the {region}?"]),
    Family("export", _slots("fmt", FORMATS), [
        "How do I export my data as {fmt}?", "Can I export my data to {fmt}?",
        "How can I download my data in {fmt} format?", "Export data as {fmt}?",
        "Is there a way to export everything to {fmt}?"]),
    Family("enable_2fa", [{}], [
        "How do I enable two-factor authentication?", "How can I enable 2FA?",
        "How do I set up two-factor authentication?", "Enable 2FA on my account?",
        "How do I activate two-factor authentication?"]),
    Family("disable_2fa", [{}], [
        "How do I disable two-factor authentication?", "How do I turn off two-factor authentication?",
        "How can I disable 2FA?", "How do I remove two-factor authentication?", "Disable 2FA on my account?"]),
    Family("reset_password", [{}], [
        "How do I reset my password?", "I forgot my password, how do I reset it?", "How can I reset my password?",
        "Reset password?", "How do I change my password if I forgot it?"]),
    Family("change_email", [{}], [
        "How do I change my email address?", "How can I update the email on my account?",
        "Can I change my login email?", "How do I update my email address?"]),
    Family("add_user", [{}], [
        "How do I add a user to my workspace?", "How can I invite a teammate?",
        "How do I invite someone to my workspace?", "How can I add a new member to my team?",
        "Add a user to the workspace?"]),
    Family("remove_user", [{}], [
        "How do I remove a user from my workspace?", "How can I remove a teammate?",
        "How do I delete a member from my workspace?", "How do I kick someone out of my workspace?",
        "Remove a user from the workspace?"]),
    Family("charged_twice", _slots("period", PERIODS), [
        "Why was I charged twice {period}?", "I was billed twice {period}, why?",
        "Why do I see two charges {period}?", "Double charge on my card {period}?",
        "Why did you charge me twice {period}?"]),
    Family("invoice", _slots("period", PERIODS), [
        "Where can I download my invoice for {period}?", "How do I get the invoice for {period}?",
        "Can you send me the invoice for {period}?", "I need the invoice for {period}"]),
    Family("add_seats", _slots("n", SEATS), [
        "How do I add {n} more seats?", "Can I buy {n} extra seats?", "I need {n} more seats, how do I add them?",
        "How can I add {n} seats to my subscription?"]),
    Family("cancel", [{}], [
        "How do I cancel my subscription?", "How can I cancel my plan?", "I want to cancel my subscription",
        "Cancel my subscription?", "How do I stop my subscription?"]),
    Family("pause", [{}], [
        "How do I pause my subscription?", "Can I pause my plan for a month?",
        "Is it possible to pause my subscription?", "How can I put my subscription on hold?"]),
    Family("api_limit", _slots("plan", PLANS), [
        "What is the API rate limit on the {plan} plan?", "How many API requests can I make on the {plan} plan?",
        "What are the API limits for the {plan} plan?", "API rate limit for {plan}?"]),
    Family("delete_account", [{}], [
        "How do I delete my account?", "How can I permanently delete my account?",
        "I want to delete my account and all my data", "Delete my account?"]),
    Family("storage", _slots("plan", PLANS), [
        "How much storage do I get on the {plan} plan?", "What is the storage limit of the {plan} plan?",
        "How many GB of storage does the {plan} plan include?", "Storage limit on {plan}?"]),
    Family("trial", [{}], [
        "How long is the free trial?", "How many days is the trial?", "What is the length of the free trial?",
        "How long does the trial last?"]),
    Family("payment_method", _slots("m", METHODS), [
        "Can I pay with {m}?", "Do you accept {m}?", "Is {m} accepted?", "Can I pay by {m}?"]),
]

# Follow-ups after a first question: (family of the first turn, phrasings, how the intent is made).
FOLLOWUPS = [
    ("price", ["What about the {plan2} plan?", "And the {plan2} plan?", "How about {plan2}?"], "other_plan"),
    ("seats", ["What about the {plan2} plan?", "And the {plan2} plan?", "How about {plan2}?"], "other_plan"),
    ("refund", ["What about the {plan2} plan?", "And for the {plan2} plan?"], "other_plan"),
    ("refund", ["How long does the refund take?", "When will I get the money back?",
                "How long until the refund arrives?"], "refund_time"),
    ("integration_setup", ["Does it work on mobile too?", "Does that work on the mobile app as well?"], "mobile"),
    ("integration_setup", ["What permissions does it need?", "Which permissions does the integration need?"],
     "permissions"),
    ("export", ["And how about {fmt2}?", "What about {fmt2}?"], "other_fmt"),
]


@dataclass(frozen=True)
class Intent:
    key: str
    family: str
    slots: tuple[tuple[str, str], ...]

    def fill(self, template: str, **extra: str) -> str:
        return template.format(**dict(self.slots), **extra)


@dataclass
class Request:
    messages: list[dict[str, str]]
    intent: str
    kind: str  # repeat | paraphrase | followup
    noisy: bool = False

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


# Account-specific questions: every one carries its own ticket number, amount, date or address, so
# each is its own intent; they look alike (same phrasing, other numbers) and rarely repeat.
FIRST = ["anna", "ben", "carla", "dev", "emma", "farid", "grace", "hugo", "ines", "jonas"]
COMPANIES = ["northwind", "contoso", "initech", "globex", "umbrella", "hooli"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
SPECIFIC = [
    ("invoice_vat", ["My invoice #{num} shows the wrong VAT number, can you fix it?",
                     "Invoice #{num} has an incorrect VAT ID, please correct it"]),
    ("charge_amount", ["Why was I charged ${amt} on {month} {day}?", "What is the ${amt} charge from {month} {day}?"]),
    ("ticket_status", ["Can you check the status of ticket #{num}?", "Any update on ticket #{num}?"]),
    ("user_login", ["User {email} can't log in, can you help?", "{email} is locked out of the account"]),
    ("billing_email", ["Please change the billing email to {email}", "Can you update our billing contact to {email}?"]),
    ("export_failed", ["Why did my export of {n} records fail?", "The export of {n} rows failed, what happened?"]),
    ("seat_count", ["We have {n} users but are billed for {n2}, why?", "Why are we billed for {n2} seats when we have {n}?"]),
]


def specific_request(rng: random.Random) -> tuple[str, str]:
    name, templates = rng.choice(SPECIFIC)
    v = {"num": str(rng.randint(10000, 99999)), "amt": str(rng.choice([29, 49, 99, 149, 199, 249, 480, 990])),
         "month": rng.choice(MONTHS), "day": str(rng.randint(1, 28)),
         "email": f"{rng.choice(FIRST)}@{rng.choice(COMPANIES)}.com", "n": str(rng.randint(2, 60) * 100),
         "n2": str(rng.randint(2, 60))}
    if name == "seat_count":
        v["n"] = str(rng.randint(5, 40))
        v["n2"] = str(int(v["n"]) + rng.randint(1, 9))
    keys = sorted(set(re.findall(r"{(\w+)}", " ".join(templates))))
    intent = f"{name}|" + "|".join(f"{k}={v[k]}" for k in keys)
    return rng.choice(templates).format(**v), intent


def intents() -> list[Intent]:
    out = []
    for f in FAMILIES:
        for s in f.slots:
            key = f.name + "".join(f"|{k}={v}" for k, v in sorted(s.items()))
            out.append(Intent(key, f.name, tuple(sorted(s.items()))))
    return out


def answer_for(intent: str, words: int = 110) -> str:
    """The intended answer of an intent: deterministic, about 150 tokens, tagged with the intent."""
    rng = random.Random(hashlib.sha256(intent.encode()).digest())
    vocab = ("your plan account workspace billing settings page admin open select click save the a to of "
             "and in for with this then you can will be is are on from after before team seat invoice "
             "data export support days policy request confirm").split()
    body = " ".join(rng.choice(vocab) for _ in range(words))
    return f"[{intent}] {body.capitalize()}."


def intent_of_answer(text: str) -> str | None:
    m = re.match(r"\[([^\]]+)\]", text or "")
    return m.group(1) if m else None


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k + 1) ** s for k in range(n)]


def _noise(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.45:
        return text.lower().rstrip("?")
    if r < 0.65:
        return rng.choice(["Hi, ", "Hello! ", "Quick question: ", "hey "]) + text[0].lower() + text[1:]
    if r < 0.8:
        return text + rng.choice([" Thanks!", " Thank you.", " thx"])
    words = text.split()
    idx = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not idx:
        return text.lower()
    i = rng.choice(idx)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def build_workload(n: int, seed: int = 7, followup_share: float = 0.15, noise_share: float = 0.30,
                   usual_share: float = 0.35, zipf_s: float = 1.0, specific_share: float = 0.20) -> list[Request]:
    rng = random.Random(seed)
    all_intents = intents()
    order = list(all_intents)
    rng.shuffle(order)
    weights = _zipf_weights(len(order), zipf_s)
    fam = {f.name: f for f in FAMILIES}

    def phrase(it: Intent) -> tuple[str, str, bool]:
        templates = fam[it.family].templates
        if rng.random() < usual_share:
            t, kind = templates[0], "repeat"
        else:
            t, kind = rng.choice(templates[1:]), "paraphrase"
        text = it.fill(t)
        noisy = rng.random() < noise_share
        return (_noise(rng, text) if noisy else text), kind, noisy

    out: list[Request] = []
    follow_families = {f for f, _, _ in FOLLOWUPS}
    follow_intents = [it for it in order if it.family in follow_families]
    follow_weights = _zipf_weights(len(follow_intents), zipf_s)
    while len(out) < n:
        r = rng.random()
        if r < specific_share:
            q, intent = specific_request(rng)
            out.append(Request([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}],
                               intent, "specific"))
        elif r < specific_share + followup_share:
            first = rng.choices(follow_intents, follow_weights)[0]
            options = [f for f in FOLLOWUPS if f[0] == first.family]
            _, texts, how = rng.choice(options)
            q1, _, _ = phrase(first)
            slots = dict(first.slots)
            if how == "other_plan":
                plan2 = rng.choice([p for p in PLANS if p != slots["plan"]])
                intent = first.key.split("|")[0] + f"|plan={plan2}"
                q2 = rng.choice(texts).format(plan2=plan2)
            elif how == "other_fmt":
                fmt2 = rng.choice([f for f in FORMATS if f != slots["fmt"]])
                intent = f"export|fmt={fmt2}"
                q2 = rng.choice(texts).format(fmt2=fmt2)
            else:
                intent = f"{how}|after={first.key}"
                q2 = rng.choice(texts)
            msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q1},
                    {"role": "assistant", "content": answer_for(first.key)}, {"role": "user", "content": q2}]
            out.append(Request(msgs, intent, "followup"))
        else:
            it = rng.choices(order, weights)[0]
            q, kind, noisy = phrase(it)
            out.append(Request([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}],
                               it.key, kind, noisy))
    return out


def context_key(msgs: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(msgs[:-1]).encode()).hexdigest()[:16]


# ============================================================================ helpers


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p / 100 * (len(v) - 1)))))]


def loadavg() -> str:
    try:
        return "%.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "n/a"


def say(*a: Any) -> None:
    print(*a, flush=True)


# ============================================================================ 1. offline analysis


def analyse(reqs: list[Request], embedder, static) -> dict[str, Any]:
    """Exhaustive semantic caches over the same request sequence: what each policy would serve."""
    from loadbear.gateway.cache_text import guard, normalize_exact, question_keys

    texts = sorted({r.question for r in reqs})
    t0 = time.process_time()
    vecs = embedder.embed(texts)
    embed_cpu = (time.process_time() - t0) / max(1, len(texts))
    vec = {t: v for t, v in zip(texts, vecs)}
    svec = {t: v for t, v in zip(texts, static.embed(texts))}
    qk = {t: question_keys("scope", t) for t in texts}
    probes = {t: set(k.probe) | set(k.subst) for t, k in qk.items()}
    entry_keys = {t: set(k.entry) for t, k in qk.items()}

    def run(threshold: float | None, use_guard: bool, neighbours: bool = False) -> dict[str, Any]:
        scopes: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # scope -> (norm, text, intent)
        hits = false = exact = 0
        for r in reqs:
            sc = context_key(r.messages)
            q = r.question
            norm = normalize_exact(q)
            entries = scopes[sc]
            served = next((e for e in entries if e[0] == norm), None)
            if served is not None:
                exact += 1
            elif threshold is not None and entries:
                best, best_sim = None, -1.0
                for e in entries:
                    if neighbours and not (probes[q] & entry_keys[e[1]]):
                        continue
                    if use_guard and guard(q, e[1]) is not None:
                        continue
                    s = float(vec[q] @ vec[e[1]])
                    if s > best_sim:
                        best, best_sim = e, s
                if best is not None and best_sim >= threshold:
                    served = best
            if served is None:
                entries.append((norm, q, r.intent))
            else:
                hits += 1
                false += served[2] != r.intent
        return {"hits": hits, "exact": exact, "false": false}

    policies: dict[str, Any] = {"exact only": run(None, False)}
    for t in (0.80, 0.85, 0.90, 0.95):
        policies[f"{t:.2f}"] = run(t, False)
        policies[f"{t:.2f} + guard"] = run(t, True)
    policies["0.95 + guard, neighbourhood keys"] = run(0.95, True, neighbours=True)

    # The static gate: over every (question, earlier question of the same scope) pair that shares a
    # neighbourhood key and passes the guard, the static cosine of the pairs MiniLM puts >= 0.95 vs the rest.
    seen: dict[str, list[str]] = defaultdict(list)
    accept_static, reject_static = [], []
    for r in reqs:
        sc, q = context_key(r.messages), r.question
        for e in seen[sc]:
            if e == q or not (probes[q] & entry_keys[e]) or guard(q, e) is not None:
                continue
            s = float(vec[q] @ vec[e])
            (accept_static if s >= 0.95 else reject_static).append(float(svec[q] @ svec[e]))
        if q not in seen[sc]:
            seen[sc].append(q)
    gates = {}
    for g in (0.70, 0.75, 0.80, 0.85, 0.90):
        gates[f"{g:.2f}"] = {
            "kept_of_accepted": sum(s >= g for s in accept_static) / max(1, len(accept_static)),
            "dropped_of_rejected": sum(s < g for s in reject_static) / max(1, len(reject_static)),
        }
    return {"policies": policies, "unique_questions": len(texts), "embed_cpu_ms": embed_cpu * 1000,
            "gate": gates, "pairs_accepted": len(accept_static), "pairs_rejected": len(reject_static),
            "min_static_of_accepted": min(accept_static) if accept_static else None}


# ============================================================================ 2-3. replay through the gateway

MODEL = "gpt-4o"
FEATURE = "helpdesk"


def sim_catalog(url: str) -> dict[str, Any]:
    return {
        "gpt-4o": {"provider": "openai", "base_url": url + "/v1", "api_key": "sk-sim", "input_price": 2.5,
                   "output_price": 10.0, "tier": "complex", "fallbacks": [], "max_retries": 0},
        "gpt-4o-mini": {"provider": "openai", "base_url": url + "/v1", "api_key": "sk-sim", "input_price": 0.15,
                        "output_price": 0.60, "tier": "simple", "fallbacks": [], "max_retries": 0},
    }


@dataclass
class Replay:
    cost: int = 0
    requests: int = 0
    hits: int = 0
    exact: int = 0
    semantic: int = 0
    false_hits: int = 0
    saved: int = 0
    miss_ms: list[float] = field(default_factory=list)  # lookup + store as a missing request sees them
    miss_cpu_ms: list[float] = field(default_factory=list)  # the same, CPU time (event loop + worker thread)
    miss_embedded: int = 0  # misses whose lookup had to embed the question
    hit_ms: list[float] = field(default_factory=list)
    store_ms: list[float] = field(default_factory=list)
    false_examples: list[tuple[str, str]] = field(default_factory=list)
    by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    wall_s: float = 0.0


class CacheMeter:
    """What the cache adds to each request, as the request sees it: ``key_for`` and the store's
    enqueue on the event loop, the lookup's wall time (worker-thread hop, reads, query embedding
    when one is needed) and its CPU time in the worker thread. It wraps the gateway's own cache
    object; nothing else about the request path changes."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.wall = self.cpu = self.store_wall = 0.0
        key_for, lookup, lookup_sync, store = cache.key_for, cache.lookup, cache.lookup_sync, cache.store

        def timed_key_for(*a, **kw):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return key_for(*a, **kw)
            finally:
                self.wall += time.perf_counter() - t0
                self.cpu += time.thread_time() - c0

        async def timed_lookup(*a, **kw):
            t0 = time.perf_counter()
            try:
                return await lookup(*a, **kw)
            finally:
                self.wall += time.perf_counter() - t0

        def timed_lookup_sync(*a, **kw):  # in the worker thread: its CPU only
            c0 = time.thread_time()
            try:
                return lookup_sync(*a, **kw)
            finally:
                self.cpu += time.thread_time() - c0

        def timed_store(*a, **kw):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return store(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                self.wall += dt
                self.store_wall += dt
                self.cpu += time.thread_time() - c0

        cache.key_for, cache.lookup, cache.lookup_sync, cache.store = (
            timed_key_for, timed_lookup, timed_lookup_sync, timed_store)
        self._orig = (key_for, lookup, lookup_sync, store)

    def reset(self) -> None:
        self.wall = self.cpu = self.store_wall = 0.0

    def close(self) -> None:
        c = self.cache
        c.key_for, c.lookup, c.lookup_sync, c.store = self._orig


async def replay(reqs: list[Request], gw, tenant_slug: str, cached: bool, routing: bool) -> Replay:
    """Every request through ``Gateway.chat`` (the wired request path: the cache is looked up, hits
    are served and misses stored by the gateway itself), one after the other, for one tenant whose
    settings turn the cache on or off. Cost and savings come from that tenant's ledger rows."""
    from loadbear.gateway.validation import ChatBody

    gw.tenants.create_tenant(tenant_slug, tenant_slug, {"default_model": MODEL, "cache_enabled": cached})
    _, key = gw.tenants.create_key(tenant_slug, "bench")
    auth = gw.authenticate(key)
    meter = CacheMeter(gw.cache) if cached else None
    out = Replay()
    t_start = time.perf_counter()
    try:
        for r in reqs:
            body = ChatBody(model="auto" if routing else MODEL, messages=r.messages, feature=FEATURE)
            out.requests += 1
            embedded = gw.cache.counters["embedded"] if cached else 0
            if meter is not None:
                meter.reset()
            result = await gw.chat(auth, body, FEATURE)
            lb = result.body["loadbear"]
            text = result.body["choices"][0]["message"]["content"]
            if lb["cached"]:
                out.hits += 1
                out.hit_ms.append(meter.wall * 1000)
                if lb["cache"] == "hit-exact":
                    out.exact += 1
                else:
                    out.semantic += 1
                out.by_kind[r.kind]["hit"] += 1
                if intent_of_answer(text) != r.intent:
                    out.false_hits += 1
                    out.false_examples.append((r.question, lb["cache_entry_id"]))
                continue
            out.by_kind[r.kind]["miss"] += 1
            if meter is not None:
                out.miss_ms.append(meter.wall * 1000)
                out.miss_cpu_ms.append(meter.cpu * 1000)
                out.store_ms.append(meter.store_wall * 1000)
                out.miss_embedded += gw.cache.counters["embedded"] > embedded
                # Replayed back to back: let the entry land before the next request, as it would
                # between requests arriving seconds apart.
                gw.cache.flush()
    finally:
        if meter is not None:
            meter.close()
    out.wall_s = time.perf_counter() - t_start
    gw.ledger.flush(60)
    with gw.db.tenant_tx(auth.tenant_id, write=False) as c:
        row = c.fetchone("SELECT CAST(SUM(cost_micro_usd) AS BIGINT) AS cost, CAST(SUM(saved_micro_usd) AS BIGINT)"
                         " AS saved, COUNT(*) AS n FROM ai_interactions WHERE tenant_id = ?", (auth.tenant_id,))
        out.cost, out.saved = int(row["cost"] or 0), int(row["saved"] or 0)
        assert int(row["n"]) == len(reqs), "one ledger row per request"
        # name the question each false hit was served from
        out.false_examples = [
            (q, c.scalar("SELECT query_text FROM cache_entries WHERE tenant_id = ? AND id = ?", (auth.tenant_id, e))
             or "(entry since replaced)") for q, e in out.false_examples[:10]]
    return out


# ============================================================================ 4. 100k entries in one scope

SYLL = ["zor", "bel", "qua", "tix", "mon", "dra", "vex", "lin", "pra", "kel", "sto", "ner", "gal", "fio", "rum"]
VOCAB = ("account billing invoice refund password reset login workspace gateway token usage limit quota budget "
         "request latency error retry stream answer document search query knowledge policy admin user team project "
         "key rotate export report monthly cost price upgrade plan support ticket email notification webhook "
         "integration endpoint version deploy region database backup restore security audit log access role "
         "permission calendar board task comment mention label sprint milestone template automation").split()
QWORDS = ["How do I", "Why does", "Can I", "What is", "Where can I find", "Is it possible to", "How can I", "When will"]


def synthetic_questions(rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[str]:
    names = sorted({(rng.choice(SYLL) + rng.choice(SYLL) + rng.choice(SYLL)).capitalize() for _ in range(600)})
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        r = rng.random()
        if r < 0.45:
            f = rng.choice(FAMILIES)
            t = rng.choice(f.templates)
            values = {"plan": rng.choice(names), "integ": rng.choice(names), "idp": rng.choice(names),
                      "region": rng.choice(names), "fmt": rng.choice(names).upper()[:4],
                      "period": rng.choice(["this month", "last month", f"in {rng.choice(MONTHS)}"]),
                      "n": str(rng.randint(2, 500)), "m": rng.choice(names),
                      "a": rng.choice(names), "b": rng.choice(names)}
            q = t.format(**values)
        elif r < 0.7:
            q, _ = specific_request(rng)
        else:
            words = [rng.choice(VOCAB) for _ in range(rng.randint(3, 9))]
            q = f"{rng.choice(QWORDS)} {' '.join(words)}?"
        if q not in seen:
            seen.add(q)
            out.append(q)
    return out


def near_variant(rng: random.Random, q: str) -> str:
    r = rng.random()
    if r < 0.4:
        return q.lower().rstrip("?")
    if r < 0.7:
        return "Hi, " + q[0].lower() + q[1:]
    return q + " Thanks!"


def fill_100k(cache, tenant_id: str, n: int, rng: random.Random) -> tuple[list[str], dict[str, np.ndarray], float]:
    from loadbear.gateway.cache import _Store

    texts = synthetic_questions(rng, n)
    vecs: dict[str, np.ndarray] = {}
    now = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    batch: list[Any] = []
    nrng = np.random.default_rng(1)

    def flush() -> None:
        with cache.db.tenant_tx(tenant_id) as c:
            cache._insert_many(c, batch)
        batch.clear()

    for i, q in enumerate(texts):
        scope = cache.key_for(tenant_id, FEATURE, [{"role": "system", "content": SYSTEM_PROMPT},
                                                   {"role": "user", "content": q}], "complex")
        v = nrng.standard_normal(384).astype(np.float32)
        v /= np.linalg.norm(v)
        vecs[q] = v
        batch.append(_Store(scope=scope, query=q, answer=answer_for(f"synthetic|{i}", 60), model=MODEL,
                            prompt_tokens=300, completion_tokens=80, cost=1550, citations=None, versions=None,
                            created=now, expires=now + timedelta(days=1), vector=v,
                            vector_model=cache.embedder.name))
        if len(batch) >= 2000:
            flush()
    if batch:
        flush()
    return texts, vecs, time.perf_counter() - t0


async def time_100k(cache, tenant_id: str, texts: list[str], vecs: dict[str, np.ndarray], rng: random.Random,
              queries: int) -> dict[str, Any]:
    novel = synthetic_questions(random.Random(99), queries, exclude=set(texts))
    plan: list[tuple[str, str, np.ndarray]] = []
    nrng = np.random.default_rng(2)
    for i in range(queries):
        r = i % 10
        if r < 4:
            q = rng.choice(texts)
            plan.append(("exact", q, vecs[q]))
        elif r < 7:
            q = rng.choice(texts)
            plan.append(("near", near_variant(rng, q), vecs[q]))
        else:
            v = nrng.standard_normal(384).astype(np.float32)
            plan.append(("new", novel[i], v / np.linalg.norm(v)))
    rng.shuffle(plan)
    times: dict[str, list[float]] = defaultdict(list)
    cpu: list[float] = []
    outcome: Counter = Counter()
    cands: list[int] = []
    orig = cache._candidates

    def counting(scope, t, **kw):
        rows = orig(scope, t, **kw)
        if not any(r.get("exact") for r in rows):
            cands.append(len(rows))
        return rows

    cache._candidates = counting
    try:
        for kind, q, v in plan[:50]:  # warm-up (connections, caches)
            scope = cache.key_for(tenant_id, FEATURE, [{"role": "system", "content": SYSTEM_PROMPT},
                                                       {"role": "user", "content": q}], "complex")
            cache.lookup_sync(scope, query_vector=v)
        cands.clear()
        for kind, q, v in plan:
            t0, c0 = time.perf_counter(), time.thread_time()
            scope = cache.key_for(tenant_id, FEATURE, [{"role": "system", "content": SYSTEM_PROMPT},
                                                       {"role": "user", "content": q}], "complex")
            hit = cache.lookup_sync(scope, query_vector=v)
            ms = (time.perf_counter() - t0) * 1000
            cpu.append((time.thread_time() - c0) * 1000)
            times[kind].append(ms)
            times["all"].append(ms)
            outcome[(kind, hit.kind if hit else "miss")] += 1
    finally:
        cache._candidates = orig
    # the same misses through the async API (the worker-thread hop included)
    async def run_async() -> list[float]:
        out = []
        for kind, q, v in [p for p in plan if p[0] == "new"][:200]:
            t0 = time.perf_counter()
            scope = cache.key_for(tenant_id, FEATURE, [{"role": "system", "content": SYSTEM_PROMPT},
                                                       {"role": "user", "content": q}], "complex")
            await cache.lookup(scope, query_vector=v)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    async_ms = await run_async()
    trips = round_trips(cache, tenant_id, plan)
    ab = transport_ab(cache, tenant_id, plan)
    return {"transport_ab": ab,"times": {k: {"p50": pct(v, 50), "p99": pct(v, 99), "max": max(v), "n": len(v)} for k, v in times.items()},
            "round_trips": trips,
            "outcome": {f"{k[0]}→{k[1]}": n for k, n in sorted(outcome.items())},
            "candidates": {"mean": statistics.mean(cands), "p99": pct([float(c) for c in cands], 99),
                           "max": max(cands)},
            "async_new": {"p50": pct(async_ms, 50), "p99": pct(async_ms, 99)},
            "cpu": {"p50": pct(cpu, 50), "p99": pct(cpu, 99)}}


def transport_ab(cache, tenant_id: str, plan: list[tuple[str, str, np.ndarray]]) -> dict[str, Any]:
    """The same lookups twice each, interleaved (so both see the same machine load): with the
    lookup's statement sent through ``db.tenant_fetch`` (one round trip on PostgreSQL) and through
    a plain ``tenant_tx`` (BEGIN, the tenant, the statement, COMMIT: how lookups ran before)."""
    import types

    from loadbear.storage.db import Database

    db = cache.db
    plain = types.MethodType(Database.tenant_fetch, db)
    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    background, cache.background = cache.background, False  # hit notes: not on the request path
    try:
        for i, (kind, q, v) in enumerate(plan):
            for name in (("fetch", "tx") if i % 2 else ("tx", "fetch")):
                if name == "tx":
                    db.tenant_fetch = plain
                t0, c0 = time.perf_counter(), time.thread_time()
                scope = cache.key_for(tenant_id, FEATURE, [{"role": "system", "content": SYSTEM_PROMPT},
                                                           {"role": "user", "content": q}], "complex")
                cache.lookup_sync(scope, query_vector=v)
                wall[name].append((time.perf_counter() - t0) * 1000)
                cpu[name].append((time.thread_time() - c0) * 1000)
                if name == "tx":
                    del db.tenant_fetch
    finally:
        cache.background = background
    return {name: {"p50": pct(wall[name], 50), "p99": pct(wall[name], 99), "cpu_p50": pct(cpu[name], 50),
                   "cpu_p99": pct(cpu[name], 99), "cpu_mean": statistics.mean(cpu[name])} for name in ("tx", "fetch")}


def round_trips(cache, tenant_id: str, plan: list[tuple[str, str, np.ndarray]], n: int = 30) -> dict[str, float]:
    """Round trips per lookup on the request path, by outcome: statements on SQLite (each is a
    call into the library, not a network trip), client waits on the server on PostgreSQL (through
    ``loadbear.testing.pg_round_trips``, a second connection pool on the same database). Hit notes go to the writer
    thread and are not counted (``background`` off while counting)."""
    from loadbear.gateway.cache import ResponseCache

    counts: dict[str, list[int]] = defaultdict(list)
    db = cache.db
    proxy = pdb = None
    if db.dialect == "postgres":
        from urllib.parse import urlsplit, urlunsplit

        from loadbear.storage.db import app_conninfo, open_database
        from loadbear.testing.pg_round_trips import PgRoundTripCounter

        parts = urlsplit(db.url)
        proxy = PgRoundTripCounter(parts.hostname or "127.0.0.1", parts.port or 5432)
        netloc = (parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else "") + f"127.0.0.1:{proxy.port}"
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        pdb = open_database(url, app_url=app_conninfo(url, db.app_role))
        counter = ResponseCache(pdb, embedder_factory=lambda: cache.embedder, static=cache.static, background=False)

        count = proxy.take
    else:
        counter = cache
        raw = db._conn()
        stmts: list[str] = []
        raw.set_trace_callback(stmts.append)

        def count() -> int:
            k = len(stmts)
            stmts.clear()
            return k
    background, counter.background = counter.background, False
    try:
        by_kind: dict[str, list] = defaultdict(list)
        for p in plan:
            by_kind[p[0]].append(p)
        todo = [x for k in ("exact", "near", "new") for x in by_kind[k][:n]]
        for i, (kind, q, v) in enumerate(todo[:10] + todo):  # the first 10: warm-up (connections, prepares)
            scope = counter.key_for(tenant_id, FEATURE, [{"role": "system", "content": SYSTEM_PROMPT},
                                                         {"role": "user", "content": q}], "complex")
            count()
            hit = counter.lookup_sync(scope, query_vector=v)
            k = count()
            if i >= 10:
                counts[hit.kind if hit else "miss"].append(k)
    finally:
        counter.background = background
        if pdb is not None:
            pdb.close()
            proxy.close()
        else:
            raw.set_trace_callback(None)
    return {k: statistics.mean(v) for k, v in sorted(counts.items())}


async def only_100k(args) -> None:
    """``--only-100k``: the 100k fill and lookup timing alone (SQLite; PostgreSQL too with
    ``--pg-100k``), printed, docs untouched: for iterating on the lookup."""
    from loadbear.gateway.cache import ResponseCache
    from loadbear.storage.db import open_database
    from loadbear.storage.migrate import migrate
    from loadbear.tenancy.service import TenantService

    out: dict[str, Any] = {"load_before": loadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        db = open_database(f"sqlite:///{Path(tmp) / 'cost100k.db'}")
        try:
            migrate(db)
            tenant = TenantService(db).create_tenant("bench-100k", "Bench 100k", {}).id
            cache = ResponseCache(db)
            cache.embedder.embed(["warm up"])
            say(f"[{time.strftime('%H:%M:%S')}] SQLite: filling {args.entries} entries into one scope")
            rng = random.Random(5)
            texts, vecs, fill_s = fill_100k(cache, tenant, args.entries, rng)
            out["100k"] = await time_100k(cache, tenant, texts, vecs, rng, args.queries)
            out["100k"]["fill_s"] = fill_s
            cache.close()
        finally:
            db.close()
    if args.pg_100k:
        out["100k_pg"] = await pg_100k(args)
    out["load_after"] = loadavg()
    say(json.dumps(out, default=_json_default, indent=1))


# ============================================================================ the run


def make_database(backend: str, pg_url: str | None, tmp: Path) -> tuple[str, Any]:
    if backend == "sqlite":
        return f"sqlite:///{tmp / 'cost.db'}", lambda: None
    import psycopg
    from urllib.parse import urlsplit, urlunsplit

    url = pg_url or os.environ.get("LOADBEAR_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"loadbear_bench_cost_{os.getpid()}"
    admin = psycopg.connect(url, autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(url)

    def drop() -> None:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()

    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment)), drop


async def run_gateway(args, reqs: list[Request], db_url: str) -> dict[str, Any]:
    from loadbear import Gateway, Settings
    from loadbear.config.catalog import Catalog
    from loadbear.testing.simulator import UpstreamSimulator

    by_users = {tuple(m["content"] for m in r.messages if m["role"] == "user"): r.intent for r in reqs}

    def reply(body: dict[str, Any]) -> str:
        users = tuple(m["content"] for m in body.get("messages", []) if m.get("role") == "user")
        return answer_for(by_users.get(users, "unknown"))

    sim = UpstreamSimulator(latency_ms=0).start()
    sim.set_reply(reply)
    try:
        models = sim_catalog(sim.url)
        settings = Settings.load(env={}, config_path=None, database_url=db_url, models=models,
                                 ledger_flush_interval_ms=20)
        gw = Gateway(settings, catalog=Catalog.from_settings(models, env={}, default_model=MODEL))
        gw.migrate()
        cache = gw.cache
        say(f"[{time.strftime('%H:%M:%S')}] baseline: {len(reqs)} requests, no cache, model {MODEL}")
        base = await replay(reqs, gw, "bench", cached=False, routing=False)
        say(f"  cost {base.cost} µUSD, {base.wall_s:.1f} s")
        cache.embedder.embed(["warm up"])  # load MiniLM before the clock (a server loads it at start)
        cache.static.embed(["warm up"])
        say(f"[{time.strftime('%H:%M:%S')}] cached")
        cached = await replay(reqs, gw, "bench-cached", cached=True, routing=False)
        say(f"  cost {cached.cost} µUSD, hits {cached.hits}, false {cached.false_hits}, {cached.wall_s:.1f} s")
        counters = dict(cache.counters)
        entries = cache.count(gw.tenants.get_tenant("bench-cached").id)
        out = {"baseline": base, "cached": cached, "counters": counters, "entries": entries}
        if args.routing:
            say(f"[{time.strftime('%H:%M:%S')}] routing, no cache")
            out["routed"] = await replay(reqs, gw, "bench-routed", cached=False, routing=True)
            say(f"  cost {out['routed'].cost} µUSD")
            say(f"[{time.strftime('%H:%M:%S')}] cache + routing")
            out["cached_routed"] = await replay(reqs, gw, "bench-cached-routed", cached=True, routing=True)
            r = out["cached_routed"]
            say(f"  cost {r.cost} µUSD, hits {r.hits}, false {r.false_hits}")
        if not args.skip_100k:
            t2 = gw.tenants.create_tenant("bench-100k", "Bench 100k", {})
            rng = random.Random(5)
            say(f"[{time.strftime('%H:%M:%S')}] filling {args.entries} entries into one scope")
            texts, vecs, fill_s = fill_100k(cache, t2.id, args.entries, rng)
            say(f"  {fill_s:.1f} s; timing {args.queries} lookups")
            out["100k"] = await time_100k(cache, t2.id, texts, vecs, rng, args.queries)
            out["100k"]["fill_s"] = fill_s
            out["100k"]["entries"] = cache.count(t2.id)
        await gw.aclose()
        return out
    finally:
        sim.stop()


async def pg_100k(args) -> dict[str, Any]:
    """The 100k lookup timing again on PostgreSQL (row-level security on, the app role)."""
    from loadbear.gateway.cache import ResponseCache
    from loadbear.storage.db import open_database
    from loadbear.storage.migrate import migrate
    from loadbear.tenancy.service import TenantService

    url, drop = make_database("postgres", args.pg_url, Path("."))
    db = open_database(url)
    try:
        migrate(db)
        tenant = TenantService(db).create_tenant("bench-100k", "Bench 100k", {}).id
        TenantService(db).create_tenant("bench-other", "Other", {})
        cache = ResponseCache(db)
        cache.embedder.embed(["warm up"])
        rng = random.Random(5)
        say(f"[{time.strftime('%H:%M:%S')}] PostgreSQL: filling {args.entries} entries into one scope")
        texts, vecs, fill_s = fill_100k(cache, tenant, args.entries, rng)
        with db.system_tx() as c:
            c.execute("ANALYZE cache_entries")
            c.execute("ANALYZE cache_keys")
        say(f"  {fill_s:.1f} s; timing {args.queries} lookups")
        out = await time_100k(cache, tenant, texts, vecs, rng, args.queries)
        out["fill_s"], out["entries"] = fill_s, cache.count(tenant)
        cache.close()
        return out
    finally:
        db.close()
        drop()


def single_query_embedding(emb, static, n: int = 60) -> dict[str, float]:
    qs = [r.question for r in build_workload(n, seed=3)]
    for q in qs[:5]:
        emb.embed([q])
    wall, cpu = [], []
    for q in qs:
        t0, c0 = time.perf_counter(), time.process_time()
        emb.embed([q])
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    swall = []
    for q in qs * 5:
        t0 = time.perf_counter()
        static.embed([q])
        swall.append((time.perf_counter() - t0) * 1000)
    pairs = {"lookalike": ("How do I get a refund for the Team plan?", "How do I get a refund for the Business plan?"),
             "paraphrase": ("How do I get a refund for the Team plan?", "Can I get a refund on the Team plan?")}
    sims = {}
    for name, (x, y) in pairs.items():
        sv, mv = static.embed([x, y]), emb.embed([x, y])
        sims[f"static_{name}"] = float(sv[0] @ sv[1])
        sims[f"minilm_{name}"] = float(mv[0] @ mv[1])
    return {**sims, "minilm_wall_p50": pct(wall, 50), "minilm_wall_p99": pct(wall, 99), "minilm_cpu_p50": pct(cpu, 50),
            "static_wall_p50": pct(swall, 50), "static_wall_p99": pct(swall, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1000, help="timed lookups at --entries")
    ap.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--pg-url", default=None)
    ap.add_argument("--no-routing", dest="routing", action="store_false", help='skip the "auto" (routed) runs')
    ap.add_argument("--skip-100k", action="store_true")
    ap.add_argument("--pg-100k", action="store_true", help="also time the 100k lookups on PostgreSQL")
    ap.add_argument("--only-100k", action="store_true",
                    help="only fill --entries entries and time lookups (SQLite, and PostgreSQL with --pg-100k)")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    if args.only_100k:
        asyncio.run(only_100k(args))
        return
    from loadbear.gateway.cache_text import StaticEmbedder
    from loadbear.knowledge.embeddings import MiniLMEmbedder

    started = time.time()
    load_before = loadavg()
    reqs = build_workload(args.requests, args.seed)
    kinds = Counter(r.kind for r in reqs)
    say(f"{len(reqs)} requests, {len({r.intent for r in reqs})} intents, {len({r.question for r in reqs})} distinct"
        f" questions, kinds {dict(kinds)}; load average {load_before}")
    emb = MiniLMEmbedder().load()
    static = StaticEmbedder.from_minilm(emb)
    say(f"[{time.strftime('%H:%M:%S')}] offline analysis (exhaustive semantic caches)")
    a = analyse(reqs, emb, static)
    n = len(reqs)
    for name, p in a["policies"].items():
        say(f"  {name:36s} hit {p['hits'] / n:6.1%}  false hits {p['false']:4d} = {p['false'] / max(1, p['hits']):6.2%}"
            " of hits")
    if args.analyse_only:
        return
    emb_cost = single_query_embedding(emb, static)
    say(f"  single-query embedding: {emb_cost}")
    with tempfile.TemporaryDirectory() as tmp:
        db_url, drop = make_database(args.backend, args.pg_url, Path(tmp))
        try:
            res = asyncio.run(run_gateway(args, reqs, db_url))
        finally:
            drop()
    if args.pg_100k and not args.skip_100k:
        res["100k_pg"] = asyncio.run(pg_100k(args))
    res["analysis"] = a
    res["embedding"] = emb_cost
    res["meta"] = {"requests": n, "kinds": dict(kinds), "intents": len({r.intent for r in reqs}),
                   "questions": len({r.question for r in reqs}), "backend": args.backend, "routing": args.routing,
                   "load_before": load_before, "load_after": loadavg(), "minutes": (time.time() - started) / 60,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    report = render(res)
    say(report)
    if args.out:
        Path(args.out).write_text(json.dumps(res, default=_json_default, indent=1))
    if not args.no_docs:
        write_docs(report)


def _json_default(o: Any) -> Any:
    if isinstance(o, (Replay,)):
        d = dict(o.__dict__)
        for k in ("miss_ms", "miss_cpu_ms", "hit_ms", "store_ms"):
            d[k] = {"p50": pct(d[k], 50), "p99": pct(d[k], 99), "n": len(d[k])}
        d["by_kind"] = {k: dict(v) for k, v in d["by_kind"].items()}
        return d
    if isinstance(o, Counter):
        return dict(o)
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def render(res: dict[str, Any]) -> str:
    m, a, base, c = res["meta"], res["analysis"], res["baseline"], res["cached"]
    n = m["requests"]
    saved_pct = 1 - c.cost / base.cost if base.cost else 0.0
    L: list[str] = []
    L.append("## Cache")
    L.append("")
    L.append("`bench/cost.py`: the response cache (`gateway/cache.py`) on a realistic helpdesk workload, replayed "
             "through `Gateway.chat` (the wired request path: lookup before the budget and the model call, hits "
             "served and ledgered, ok answers stored by the gateway) against the upstream simulator, and lookups "
             "against 100k entries in one scope.")
    L.append("")
    L.append("```\n.venv/bin/python bench/cost.py --pg-100k     # --backend postgres, --no-routing, --requests N\n```")
    L.append("")
    L.append(f"Measured {m['date']} on {m['machine']}, {m['backend']} backend, load average {m['load_before']} at the"
             f" start and {m['load_after']} at the end (a shared machine); {m['minutes']:.1f} min.")
    L.append("")
    k = m["kinds"]
    L.append(f"Workload: {n} requests over {m['intents']} intents ({m['questions']} distinct questions): "
             f"{k.get('repeat', 0)} in an intent's usual phrasing, {k.get('paraphrase', 0)} paraphrased, "
             f"{k.get('followup', 0)} multi-turn follow-ups, {k.get('specific', 0)} account-specific questions "
             "(ticket numbers, amounts, dates, e-mail addresses: each its own intent, look-alikes of each other); "
             "30% of the single-turn questions carry noise (lower case, greetings, thanks, typos). Intents by Zipf "
             "(s = 1.0); look-alikes by construction (other plan, integration, format, period or count; "
             "enable/disable, add/remove, upgrade/downgrade, cancel/pause, set up/broken). A false hit is a cached "
             "answer built for another intent. See the docstring of `bench/cost.py`.")
    L.append("")
    L.append("### On the workload (the real cache, through the gateway)")
    L.append("")
    L.append("| | value | target | |")
    L.append("|---|---:|---:|---|")
    hr = c.hits / n
    fr = c.false_hits / max(1, c.hits)
    L.append(f"| hit rate | {hr:.1%} ({c.exact} exact, {c.semantic} semantic) | | |")
    L.append(f"| false-hit rate (of hits) | {fr:.2%} ({c.false_hits} of {c.hits}) | ≤ 1% | {'✅' if fr <= 0.01 else '❌'} |")
    L.append(f"| cost without cache and routing | {base.cost / 1e6:.4f} USD | | |")
    if "routed" in res:
        ro, cr = res["routed"], res["cached_routed"]
        both = 1 - cr.cost / base.cost if base.cost else 0.0
        L.append(f"| cost with routing only (`auto`) | {ro.cost / 1e6:.4f} USD ({1 - ro.cost / base.cost:.1%} lower) | | |")
        L.append(f"| cost with cache only | {c.cost / 1e6:.4f} USD ({saved_pct:.1%} lower) | | |")
        L.append(f"| cost with cache and routing | {cr.cost / 1e6:.4f} USD ({both:.1%} lower; hit rate "
                 f"{cr.hits / n:.1%}, {cr.false_hits} false hits) | ≥ 40% lower | {'✅' if both >= 0.40 else '❌'} |")
    else:
        L.append(f"| cost with cache | {c.cost / 1e6:.4f} USD ({saved_pct:.1%} lower) | ≥ 40% lower |"
                 f" {'✅' if saved_pct >= 0.40 else '❌'} |")
    mp50 = pct(c.miss_ms, 50)
    L.append(f"| added to a request that misses, p50 (scope, lookup, store; embedding included) | {mp50:.2f} ms | ≤ 5 ms |"
             f" {'✅' if mp50 <= 5 else '❌'} |")
    L.append(f"| … p99 | {pct(c.miss_ms, 99):.2f} ms | | |")
    L.append(f"| … CPU time (loop + worker thread), p50 / p99 | {pct(c.miss_cpu_ms, 50):.2f} / "
             f"{pct(c.miss_cpu_ms, 99):.2f} ms | | |")
    L.append(f"| misses whose lookup embedded the question (MiniLM) | {c.miss_embedded} of {len(c.miss_ms)} "
             f"({c.miss_embedded / max(1, len(c.miss_ms)):.1%}) | | |")
    L.append(f"| store on the request path (enqueue), p50 / p99 | {pct(c.store_ms, 50):.3f} / {pct(c.store_ms, 99):.3f} ms | | |")
    L.append(f"| lookup that hits, p50 / p99 | {pct(c.hit_ms, 50):.2f} / {pct(c.hit_ms, 99):.2f} ms | | |")
    if "100k" in res:
        t = res["100k"]
        tm = t["times"]
        ok = tm["all"]["p99"] <= 5
        L.append(f"| lookup at {t['entries']:,} entries in one scope, p99 (query embedding excluded) | "
                 f"{tm['all']['p99']:.2f} ms (p50 {tm['all']['p50']:.2f}) | ≤ 5 ms | {'✅' if ok else '❌'} |")
    if "100k_pg" in res:
        t = res["100k_pg"]
        tm = t["times"]
        L.append(f"| … the same on PostgreSQL (RLS, app role), p99 | {tm['all']['p99']:.2f} ms (p50 {tm['all']['p50']:.2f})"
                 f" | ≤ 5 ms | {'✅' if tm['all']['p99'] <= 5 else '❌'} |")
    L.append("")
    ctr = res["counters"]
    L.append("Hits by request kind: " + ", ".join(
        f"{kind} {v.get('hit', 0)}/{v.get('hit', 0) + v.get('miss', 0)}" for kind, v in sorted(c.by_kind.items()))
        + f". Cache entries at the end: {res['entries']}. Lookup counters: {ctr}.")
    if c.false_examples:
        L.append("")
        L.append("False hits: " + "; ".join(f"“{q}” ← “{e}”" for q, e in c.false_examples[:5]))
    e = res["embedding"]
    L.append("")
    L.append(f"Query embedding on this machine, one question at a time: all-MiniLM-L6-v2 p50 {e['minilm_wall_p50']:.1f} ms"
             f" wall (p99 {e['minilm_wall_p99']:.1f}), {e['minilm_cpu_p50']:.1f} ms CPU; the static bag-of-word-pieces"
             f" vector p50 {e['static_wall_p50'] * 1000:.0f} µs (p99 {e['static_wall_p99'] * 1000:.0f} µs). Embedding"
             f" every lookup with MiniLM would alone cost more than the 5 ms budget; the cache embeds only when a"
             f" neighbourhood candidate survived the guard and the static gate.")
    pol = a["policies"]
    no_guard, with_guard = pol["0.95"], pol["0.95 + guard"]
    L.append("")
    L.append("Decisions, from these numbers:")
    L.append("")
    L.append(f"* **Threshold 0.95 (the default) with the look-alike guard.** An exhaustive MiniLM cache at 0.95 "
             f"without the guard serves {no_guard['false'] / max(1, no_guard['hits']):.1%} of its hits to another intent on "
             "this workload (GPTCache's own benchmark: 5.6% at 0.95); the false hits are look-alikes that differ in one "
             "salient token (another plan, ticket number, month, amount, e-mail). With the guard: "
             f"{with_guard['false']} of {with_guard['hits']}. The guard also keeps 0.90 clean here "
             f"({pol['0.90 + guard']['false']} false hits, {pol['0.90 + guard']['hits'] / n:.1%} hit rate against "
             f"{with_guard['hits'] / n:.1%}), but it was written for look-alikes of the same shapes as this workload's, "
             "so the default stays at 0.95 and a tenant may lower it (`cache_threshold`). The degraded path uses 0.85.")
    L.append(f"* **Embedding only when a candidate needs it.** MiniLM costs {e['minilm_wall_p50']:.0f} ms wall / "
             f"{e['minilm_cpu_p50']:.0f} ms CPU per question here, so embedding every lookup would blow the 5 ms budget "
             "by itself, and embedding after an exact miss only is still every miss. Candidates instead come from "
             "word-set neighbourhood keys (an index read), then the guard, then a static bag-of-word-pieces vector "
             "(~0.1 ms, no model run) drops far ones; only what survives is compared with MiniLM. "
             f"{c.miss_embedded / max(1, len(c.miss_ms)):.0%} of misses paid for an embedding. The neighbourhood keys "
             f"lose little against an exhaustive scan: {pol['0.95 + guard, neighbourhood keys']['hits'] / n:.1%} vs "
             f"{with_guard['hits'] / n:.1%} hit rate. A static-only cache was rejected: it cannot tell look-alikes from "
             f"paraphrases (\"refund for the Team plan\" / \"… Business plan\": static {e['static_lookalike']:.2f}, "
             f"MiniLM {e['minilm_lookalike']:.2f}; / \"Can I get a refund on the Team plan?\": static "
             f"{e['static_paraphrase']:.2f}, MiniLM {e['minilm_paraphrase']:.2f}). Batching: "
             "stored questions are embedded in batches on the writer thread; a lookup that embedded hands its vector "
             "to the store. A grounded request could hand its retrieval's query vector (`lookup(query_vector=...)`).")
    L.append("* **What a tenant can learn about its own cache.** A hit answers in about a millisecond and says so "
             "(`cached`, the kind, the similarity), so a caller learns that someone in the same tenant, feature, "
             "system prompt and conversation asked the same or a near-identical question within the TTL, and sees "
             "the answer given then. Nothing crosses tenants: the scope hash, every key and every row carry the "
             "tenant (RLS on PostgreSQL), and another tenant's entries change no lookup's work. Requests whose end "
             "users must not learn about each other's questions should bypass the cache (`\"cache\": false` or "
             "`X-Loadbear-Cache: off`), or the tenant leaves it off (it is opt-in: `cache_enabled`).")
    L.append("* **Where it sits on the request path.** `Gateway.chat`: rate limits → retrieval (a grounded "
             "request's sources are part of its scope) → cache lookup → on a miss the budget reservation and the "
             "model chain. A hit therefore reserves nothing, costs 0 and is served even at the hard budget limit; "
             "its ledger row says `cached`, the kind, the similarity, the entry and `saved_micro_usd` (the entry's "
             "tokens at its model's catalog price). The scope's model part is the tier the router picked for "
             "`auto` (fixed before any budget downgrade) and the model itself for an explicit one; only answers of "
             "that tier or model are stored (not a failover's or a downgrade's), and only ok, complete "
             "(`finish_reason` stop), non-continued answers, queued to the writer thread. When every model fails, "
             "the scope's most similar entry at the degraded threshold is served marked degraded.")
    L.append("")
    L.append("### Exhaustive semantic caches on the same requests (offline: what each policy would serve)")
    L.append("")
    L.append("Every distinct question embedded with all-MiniLM-L6-v2; each request compared with every entry of its "
             "scope (no candidate generation); exact normalised matches first. \"guard\" is the look-alike guard of "
             "`gateway/cache_text.py`.")
    L.append("")
    L.append("| policy | hit rate | false hits | of hits |")
    L.append("|---|---:|---:|---:|")
    for name, p in a["policies"].items():
        L.append(f"| {name} | {p['hits'] / n:.1%} | {p['false']} | {p['false'] / max(1, p['hits']):.2%} |")
    L.append("")
    g = a["gate"]
    L.append(f"Static gate (candidate pairs that share a neighbourhood key and pass the guard: {a['pairs_accepted']} "
             f"MiniLM ≥ 0.95, {a['pairs_rejected']} below): " + "; ".join(
                 f"{th}: keeps {v['kept_of_accepted']:.1%} of the accepted, drops {v['dropped_of_rejected']:.1%} of the rest"
                 for th, v in g.items()) + ".")
    if "100k" in res:
        t = res["100k"]
        L.append("")
        L.append(f"### {t['entries']:,} entries in one scope of one tenant")
        L.append("")
        L.append(f"Filled in {t['fill_s']:.0f} s (synthetic questions from the families with 600 invented names, "
                 "account-specific questions, and random support-vocabulary questions; random stored vectors). "
                 f"{sum(t['times'][k]['n'] for k in ('exact', 'near', 'new'))} lookups with the query vector given: "
                 "exact repeats, near variants of stored questions (lower case, a greeting, thanks: semantic hits) and "
                 "new questions (misses). Outcomes: " + ", ".join(f"{k} {v}" for k, v in t["outcome"].items()) + ".")
        L.append("")
        L.append("| lookups | p50 | p99 | max |")
        L.append("|---|---:|---:|---:|")
        for kind in ("all", "exact", "near", "new"):
            v = t["times"][kind]
            L.append(f"| {kind} ({v['n']}) | {v['p50']:.2f} ms | {v['p99']:.2f} ms | {v['max']:.2f} ms |")
        L.append("")
        L.append(f"The lookups' own CPU time (thread time: what remains without the machine's other load): p50 "
                 f"{t['cpu']['p50']:.2f} ms, p99 {t['cpu']['p99']:.2f} ms. "
                 f"Candidates read per semantic lookup: mean {t['candidates']['mean']:.1f}, p99 {t['candidates']['p99']:.0f},"
                 f" max {t['candidates']['max']} (capped at 16). The same new-question lookups through `await "
                 f"cache.lookup` (worker-thread hop included): p50 {t['async_new']['p50']:.2f} ms, p99 "
                 f"{t['async_new']['p99']:.2f} ms.")
        L += _transport_lines(t, "statements (BEGIN and COMMIT included)", "one statement, no BEGIN/COMMIT")
    if "100k_pg" in res:
        t = res["100k_pg"]
        L.append("")
        L.append(f"PostgreSQL, the same {t['entries']:,} entries and lookups (filled in {t['fill_s']:.0f} s), through "
                 "`db.tenant_fetch` (app role, the tenant set in the read's own transaction: row-level security; "
                 "the setting and the read pipelined, one round trip): outcomes " + ", ".join(
                     f"{k} {v}" for k, v in t["outcome"].items()) + ".")
        L.append("")
        L.append("| lookups | p50 | p99 | max |")
        L.append("|---|---:|---:|---:|")
        for kind in ("all", "exact", "near", "new"):
            v = t["times"][kind]
            L.append(f"| {kind} ({v['n']}) | {v['p50']:.2f} ms | {v['p99']:.2f} ms | {v['max']:.2f} ms |")
        L.append("")
        L.append(f"Thread CPU p50 {t['cpu']['p50']:.2f} ms, p99 {t['cpu']['p99']:.2f} ms; through `await cache.lookup`: "
                 f"p50 {t['async_new']['p50']:.2f} ms, p99 {t['async_new']['p99']:.2f} ms.")
        L += _transport_lines(t, "round trips to the server (BEGIN, the tenant, the read, COMMIT)",
                              "one round trip (pipelined)")
    return "\n".join(L) + "\n"


def _transport_lines(t: dict[str, Any], old: str, new: str) -> list[str]:
    if "transport_ab" not in t:
        return []
    ab, rt = t["transport_ab"], t.get("round_trips", {})
    trips = ", ".join(f"{k} {v:g}" for k, v in rt.items())
    return ["", f"Per lookup on the request path, {new}: {trips}. The same lookups once more, each twice, interleaved "
            "(same machine load), with the lookup's statement in a plain `tenant_tx` (how lookups ran before: "
            f"{old}) and through `db.tenant_fetch`:", "",
            "| transport | p50 | p99 | CPU p50 | CPU p99 | CPU mean |", "|---|---:|---:|---:|---:|---:|"] + [
        f"| {name} | {ab[k]['p50']:.2f} ms | {ab[k]['p99']:.2f} ms | {ab[k]['cpu_p50']:.3f} ms | "
        f"{ab[k]['cpu_p99']:.3f} ms | {ab[k]['cpu_mean']:.3f} ms |"
        for k, name in (("tx", "`tenant_tx`"), ("fetch", "`tenant_fetch`"))]


def write_docs(section: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Cache\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
