"""Data preparation throughput: 50,000 Alpaca-like rows through get_data's core.

    .venv/bin/python -m bench.prepare_data [--rows 50000] [--max-length 1024]

Times the stages users wait for (read + canonicalise, tokenize with the chat template,
pandera validation, split, packing) on the embedded model's tokenizer, prints a table
and writes bench/results/prepare_data.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

from bench.alpaca_like import write_jsonl
from bench.common import print_table, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--profile", action="store_true", help="print the top functions by cumulative time")
    args = ap.parse_args()

    from llm_finetune.config import EMBEDDED_MODEL, DataConfig
    from llm_finetune.data.prepare import prepare
    from llm_finetune.model import load_tokenizer, materialize

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer(materialize(EMBEDDED_MODEL, tmp / "model"))
        src = write_jsonl(tmp / "alpaca_like.jsonl", args.rows)
        results = []
        for packing in (False, True):
            cfg = DataConfig(source=str(src), max_length=args.max_length, packing=packing, truncation=True)
            prof = cProfile.Profile() if (args.profile and packing) else None
            start = time.perf_counter()
            if prof:
                prof.enable()
            p = prepare(cfg, tokenizer)
            if prof:
                prof.disable()
            seconds = time.perf_counter() - start
            tokens = int(p.train_tokens["seq_lens"].map(sum).sum())
            results.append(
                {
                    "packing": packing,
                    "rows_in": p.report.rows_in,
                    "rows_kept": p.report.rows_kept,
                    "seconds": round(seconds, 2),
                    "rows_per_s": round(p.report.rows_in / seconds, 1),
                    "train_tokens": tokens,
                    "token_rows": len(p.train_tokens),
                    "slot_efficiency": round(p.packing_efficiency, 4),
                }
            )
            if prof:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(15)
                print(out.getvalue())
    print(f"prepare(): {args.rows} Alpaca-like rows, max_length {args.max_length}, truncation on")
    print_table(results, list(results[0]))
    path = write_result("prepare_data", {"rows": args.rows, "max_length": args.max_length, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
