"""Evaluation before shipping: datasets, retrieval vs generation metrics, stored runs, compare, report.

    from loadbear.evals.dataset import load_dataset
    from loadbear.evals.runner import EvalConfig, run_eval

    dataset = load_dataset("examples/helpdesk/eval.yaml")
    run = await run_eval(gateway, gateway.tenants.get_tenant("demo"), dataset, EvalConfig(label="baseline"))
    run["summary"]["metrics"]["retrieval.recall@5"], run["results"][0]["diagnosis"]

See ``docs/evals.md`` for the metrics, the diagnosis and the defaults.
"""
