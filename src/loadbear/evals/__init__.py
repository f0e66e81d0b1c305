"""Evaluation before shipping: datasets, retrieval vs generation metrics, stored runs, compare, report.

    from loadbear.evals.dataset import load_dataset
    from loadbear.evals.runner import run_eval

    dataset = load_dataset("examples/helpdesk/eval.yaml")
    run = await run_eval(gateway, tenant, dataset, label="baseline")

See ``docs/evals.md`` for the metrics, the diagnosis and the defaults.
"""
