"""``loadbear router ...``: explain a routing decision, train the learned classifier.

Exit codes: 0 fine; 2 a usage problem (unreadable or invalid examples, model file).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import typer

router_app = typer.Typer(help="Complexity routing for model \"auto\": explain decisions, train the learned classifier.",
                         no_args_is_help=True)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@router_app.command()
def train(
    data: Path = typer.Argument(..., help="Labelled examples: JSONL lines {\"text\": ..., \"tier\": ...} or YAML."),
    out: Path = typer.Option(Path("router.json"), "--out", "-o", help="Where to write the model (JSON)."),
    holdout: float = typer.Option(0.2, min=0.0, max=0.5,
                                  help="Share of examples kept out of training to measure accuracy (0: none)."),
    epochs: int = typer.Option(400, min=10, help="Gradient steps."),
    l2: float = typer.Option(1e-2, min=0.0, help="L2 regularisation."),
    seed: int = typer.Option(0, help="Shuffle seed for the hold-out split."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train the learned classifier (MiniLM embeddings + rule features → logistic regression).

    Point ``LOADBEAR_ROUTER_MODEL_PATH`` (or ``router_model_path``) at the written file to use it.
    """
    from loadbear.gateway.router import LearnedClassifier, RouterError, classify_rules, load_examples

    try:
        examples = load_examples(data)
    except RouterError as exc:
        _fail(str(exc))
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_test = int(len(shuffled) * holdout) if len(shuffled) >= 10 else 0
    test, train_set = shuffled[:n_test], shuffled[n_test:]
    try:
        model = LearnedClassifier.train(train_set, epochs=epochs, l2=l2)
    except RouterError as exc:
        _fail(str(exc))
    summary = {"examples": len(examples), "trained_on": len(train_set), "tiers": model.tiers,
               "train_accuracy": model.meta.get("train_accuracy")}
    if test:
        predicted = model.predict([e.text for e in test])
        rules = [classify_rules([], e.grounded, text=e.text).tier for e in test]
        summary["holdout"] = len(test)
        summary["holdout_accuracy"] = round(sum(p == e.tier for p, e in zip(predicted, test)) / len(test), 4)
        summary["rules_holdout_accuracy"] = round(sum(p == e.tier for p, e in zip(rules, test)) / len(test), 4)
        if n_test:  # the saved model learns from every example
            model = LearnedClassifier.train(examples, embedder=model.embedder, epochs=epochs, l2=l2)
    model.meta.update({k: v for k, v in summary.items() if k.startswith(("holdout", "rules_"))})
    path = model.save(out)
    summary["model"] = str(path)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"trained on {len(train_set)} of {len(examples)} examples, tiers {', '.join(model.tiers)}")
    typer.echo(f"train accuracy {summary['train_accuracy']}")
    if test:
        typer.echo(f"hold-out accuracy {summary['holdout_accuracy']} on {len(test)} examples "
                   f"(rules alone: {summary['rules_holdout_accuracy']})")
    typer.echo(f"wrote {path}; use it with LOADBEAR_ROUTER_MODEL_PATH={path}")


@router_app.command()
def explain(
    text: str = typer.Argument(..., help="The request (the last user message)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A learned model file (default: the rules, "
                                         "or LOADBEAR_ROUTER_MODEL_PATH)."),
    grounded: bool = typer.Option(False, "--grounded", help="The answer is grounded in retrieved sources."),
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON."),
) -> None:
    """Show the tier a request gets, why, and the model the configured catalog routes it to."""
    from loadbear.config.catalog import Catalog, CatalogError
    from loadbear.config.settings import Settings
    from loadbear.gateway.router import LearnedClassifier, Router, RouterError
    from loadbear.tenancy.models import TenantSettings

    settings = Settings.load()
    try:
        router = Router(LearnedClassifier.load(model)) if model else Router.from_settings(settings)
    except RouterError as exc:
        _fail(str(exc))
    messages = [{"role": "user", "content": text}]
    decision = None
    try:
        catalog = Catalog.from_settings(settings.models, default_model=settings.default_model)
        decision = router.route(catalog, TenantSettings(), messages, grounded)
        c = decision.classification
    except CatalogError:
        c = router.classify(messages, grounded)
    assert c is not None
    out = {"tier": c.tier, "classifier": c.classifier, "reason": c.reason, "features": c.public_features()}
    if c.confidence is not None:
        out["confidence"] = c.confidence
    if decision is not None:
        out["model"] = decision.model
        out["route_reason"] = decision.reason
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"tier:   {c.tier} ({c.classifier})")
    typer.echo(f"reason: {c.reason}")
    if decision is not None:
        typer.echo(f"model:  {decision.model}")
    typer.echo("features: " + ", ".join(f"{k}={v}" for k, v in out["features"].items()))
