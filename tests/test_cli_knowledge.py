"""`loadbear ingest` and `loadbear reembed`, run as real subprocesses against a SQLite file.

The re-embed test switches the embedding model to a catalog entry served by the upstream
simulator's OpenAI-compatible /v1/embeddings, as an operator would after changing models.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadbear.storage.db import open_database

DOCS = Path(__file__).parent / "data" / "docs"


def run(args, env_extra, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("LOADBEAR_CONFIG", "LOADBEAR_EMBEDDING_MODEL")}
    env.update(env_extra)
    p = subprocess.run([sys.executable, "-m", "loadbear.cli", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def chunk_models(url: str) -> list[tuple[str, int]]:
    db = open_database(url)
    try:
        with db.system_tx(write=False) as c:
            rows = c.fetchall("SELECT embedding_model, embedding_dim, COUNT(*) AS n FROM chunks"
                              " GROUP BY embedding_model, embedding_dim ORDER BY embedding_model")
        return [(r["embedding_model"], int(r["embedding_dim"])) for r in rows]
    finally:
        db.close()


def documents(url: str) -> dict[str, dict]:
    db = open_database(url)
    try:
        with db.system_tx(write=False) as c:
            rows = c.fetchall("SELECT external_id, version, chunk_count, source_url FROM documents")
        return {r["external_id"]: r for r in rows}
    finally:
        db.close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    f = tmp_path / "kb"
    (f / "sub").mkdir(parents=True)
    for name in ("guide.md", "corrupt.pdf", "empty.txt", "latin1.txt", "handbook.html"):
        shutil.copy(DOCS / name, f / name)
    shutil.copy(DOCS / "policy.docx", f / "sub" / "policy.docx")
    shutil.copy(DOCS / "program.exe", f / "program.exe")  # not a supported suffix: a folder skips it
    return f


def test_ingest_folders_and_files_reports_each_bad_file_and_goes_on(tmp_path: Path, folder: Path):
    env = {"LOADBEAR_DATABASE_URL": f"sqlite:///{tmp_path / 'kb.db'}"}
    run(["migrate"], env)
    run(["tenants", "create", "acme"], env)
    notes = tmp_path / "notes.txt"
    shutil.copy(DOCS / "notes.txt", notes)
    exe = tmp_path / "tool.exe"
    shutil.copy(DOCS / "program.exe", exe)
    missing = str(tmp_path / "nowhere.md")

    p = run(["ingest", "--tenant", "acme", str(folder), str(notes), str(exe), missing, "--json"], env)
    out = json.loads(p.stdout)
    assert out["ingested"] == 4 and out["failed"] == 5
    by_path = {Path(r["path"]).name: r for r in out["files"]}
    assert by_path["nowhere.md"]["error"] == "no such file or folder"
    assert by_path["empty.txt"]["error"] == "empty_file: the file 'empty.txt' is empty"
    assert by_path["latin1.txt"]["error"] == (
        "bad_encoding: the file is not valid UTF-8: cannot decode 0xE9 at byte offset 3 (line 1, column 4); "
        "save it as UTF-8 (or UTF-16 with a byte-order mark)")
    assert by_path["corrupt.pdf"]["error"].startswith("corrupt_file: the PDF cannot be read: ")
    assert by_path["tool.exe"]["error"].startswith("unsupported_type: unsupported extension '.exe'")
    assert "program.exe" not in by_path, "a folder only contributes supported files"
    for name in ("guide.md", "handbook.html", "policy.docx", "notes.txt"):
        assert by_path[name]["ok"] and by_path[name]["chunks"] >= 1 and by_path[name]["version"] == 1
    # a folder's files are named relative to it: re-ingesting it replaces the same documents
    docs = documents(env["LOADBEAR_DATABASE_URL"])
    assert set(docs) == {"guide.md", "handbook.html", "sub/policy.docx", "notes.txt"}
    assert docs["guide.md"]["source_url"] == f"file://{(folder / 'guide.md').resolve()}"

    p = run(["ingest", "--tenant", "acme", str(folder)], env)
    assert "ingested 3 file(s) into acme" in p.stdout and "3 failed" in p.stdout
    assert "✗" in p.stderr and "empty.txt: empty_file: the file 'empty.txt' is empty" in p.stderr
    docs = documents(env["LOADBEAR_DATABASE_URL"])
    assert len(docs) == 4 and docs["guide.md"]["version"] == 2 and docs["notes.txt"]["version"] == 1

    # nothing ingested at all is a failure; an unknown tenant is a usage error
    bad = run(["ingest", "--tenant", "acme", str(folder / "empty.txt")], env, check=False)
    assert bad.returncode == 1 and "0 file(s)" in bad.stdout
    nobody = run(["ingest", "--tenant", "nope", str(folder)], env, check=False)
    assert nobody.returncode == 2 and "no tenant with slug 'nope'" in nobody.stderr


def test_reembed_after_changing_the_embedding_model(tmp_path: Path, simulator):
    url = f"sqlite:///{tmp_path / 'kb.db'}"
    env = {"LOADBEAR_DATABASE_URL": url}
    run(["migrate"], env)
    run(["tenants", "create", "acme"], env)
    run(["ingest", "--tenant", "acme", str(DOCS / "guide.md"), str(DOCS / "notes.txt")], env)
    before = chunk_models(url)
    assert [m for m, _ in before] == ["all-MiniLM-L6-v2"] and before[0][1] == 384

    config = tmp_path / "loadbear.toml"
    config.write_text(
        '[models.emb]\nprovider = "openai"\nupstream_model = "text-embedding-3-small"\n'
        f'base_url = "{simulator.url}/v1"\napi_key = "sk-sim"\n')
    switched = {**env, "LOADBEAR_CONFIG": str(config), "LOADBEAR_EMBEDDING_MODEL": "emb"}
    p = run(["reembed", "--tenant", "acme"], switched)
    n = int(p.stdout.split()[1])
    assert n >= 2 and p.stdout.strip().endswith("for acme with emb")
    assert chunk_models(url) == [("emb", 1536)]
    calls = [r for r in simulator.requests if r.path == "/v1/embeddings"]
    assert calls and sum(len(r.body["input"]) for r in calls) == n
    assert all(r.body["model"] == "text-embedding-3-small" for r in calls)
    # nothing left to do the second time
    assert "re-embedded 0 chunk(s)" in run(["reembed", "--tenant", "acme"], switched).stdout
    nobody = run(["reembed", "--tenant", "nope"], switched, check=False)
    assert nobody.returncode == 2 and "no tenant with slug 'nope'" in nobody.stderr

    # the re-embedded vectors are the ones searched with the new model
    from loadbear import Gateway, Settings

    gw = Gateway.from_settings(Settings.load(env={"LOADBEAR_EMBEDDING_MODEL": "emb", "LOADBEAR_DATABASE_URL": url},
                                             config_path=config))
    try:
        tenant = gw.tenants.get_tenant("acme")
        hits = gw.knowledge.query(tenant.id, "installation steps", top_k=3, mode="vector")
        assert len(hits) == 3 and all(h.embedding_model == "emb" for h in hits)
    finally:
        gw.close()
