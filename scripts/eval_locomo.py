"""LoCoMo with the official metric, in four protocols (plus memory_only's no-history control).

See `deltamem_jax/evaluation/locomo.py` for the protocols and prompts and
`deltamem_jax/evaluation/locomo_metric.py` for the scoring. Per-question records are
appended to `--results` (JSONL); rerunning the same command resumes where it stopped.

Usage:
  python scripts/eval_locomo.py --conversations 1 --max-questions 40 --protocol all --json out.json
  python scripts/eval_locomo.py --protocol memory_only --categories 1,2,3,4 --greedy --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CATEGORY_ORDER = (1, 2, 3, 4, 5)


def parse_args(argv=None):
    from deltamem_jax.evaluation.locomo import DEFAULT_DATA, PROTOCOLS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="locomo10.json (CC BY-NC 4.0; read in place, never copied)")
    p.add_argument("--protocol", default="all", help=f"comma-separated, or all: {', '.join(PROTOCOLS)}")
    p.add_argument("--conversations", type=int, help="only the first N conversations")
    p.add_argument("--max-questions", type=int, help="only the first N questions (after the category filter) of each conversation")
    p.add_argument("--categories", default="1,2,3,4,5", help="question categories to ask")
    p.add_argument("--adapter", help="δ-mem adapter folder (default: the shipped one)")
    p.add_argument("--model", help="HF folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--write-mode", choices=["token", "message_mean"], help="override the adapter's write granularity")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: the official temperature 0.4, top-p 0.9, top-k 10)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="questions decoded together per snapshot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="runs/locomo/results.jsonl", help="per-question records (resume file)")
    p.add_argument("--time-limit", type=float, help="start no new batch after this many seconds; summarize what is done (rerun to resume)")
    p.add_argument("--json", help="summary output")
    return p.parse_args(argv)


def load_model(a):
    import dataclasses

    from deltamem_jax.adapter import adapter_identity, attach, load_adapter, memory_of
    from deltamem_jax.cli import load_backbone
    from deltamem_jax.config import DeltaMemConfig
    from deltamem_jax.session import DEFAULT_ADAPTER

    model, tok = load_backbone(a.model, "float32")
    adapter = a.adapter or (DEFAULT_ADAPTER if (DEFAULT_ADAPTER / "delta_mem_config.json").is_file() else None)
    if adapter is None:
        attach(model, DeltaMemConfig())
        note, identity = "untrained adapter", None
    else:
        load_adapter(model, adapter)
        note, identity = str(adapter), adapter_identity(adapter)
    if a.write_mode:
        mem = memory_of(model)
        mem.config = dataclasses.replace(mem.config, write_granularity=a.write_mode)
    return model, tok, note, identity


def check_resumable(records: list[dict], fingerprint: dict[str, str], path: Path) -> None:
    """Refuses to mix answers of another backbone, or of another adapter where the protocol
    uses the memory (`frozen` and `no_history` answers do not depend on the adapter, so they
    carry over to a new adapter)."""
    for r in records:
        if r.get("model", fingerprint["model"]) != fingerprint["model"]:
            raise SystemExit(f"error: {path} holds answers of another backbone ({r['model']}, this one is {fingerprint['model']}); use another --results file")
        if r["protocol"] not in ("frozen", "no_history") and r.get("adapter", fingerprint["adapter"]) != fingerprint["adapter"]:
            raise SystemExit(f"error: {path} holds {r['protocol']} answers of another adapter (sha256 {r['adapter'][:12]}…, this one is "
                             f"{fingerprint['adapter'][:12]}…); use another --results file, keeping only its frozen and no_history lines")  # fmt: skip


def main(argv=None) -> int:
    a = parse_args(argv)
    from tqdm.auto import tqdm

    from deltamem_jax.decoding import Sampling
    from deltamem_jax.evaluation.locomo import OFFICIAL_SAMPLING, PROTOCOLS, LoCoMoRunner, load_conversations
    from deltamem_jax.evaluation.locomo_metric import CATEGORY_NAMES, summarize
    from deltamem_jax.session import model_fingerprint

    protocols = PROTOCOLS if a.protocol == "all" else tuple(a.protocol.split(","))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        print(f"error: unknown protocol(s) {unknown}; known: {', '.join(PROTOCOLS)} or all", file=sys.stderr)
        return 2
    categories = {int(c) for c in a.categories.split(",")}
    convs = load_conversations(a.data)[: a.conversations]
    model, tok, note, identity = load_model(a)
    sampling = Sampling() if a.greedy else OFFICIAL_SAMPLING
    results = Path(a.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    fingerprint = model_fingerprint(model)
    check_resumable(records, fingerprint, results)
    done = {(r["protocol"], r["sample_id"], r["qa_index"]) for r in records}
    t0 = time.perf_counter()
    before = max((r.get("run_seconds", 0.0) for r in records), default=0.0)

    def out_of_time() -> bool:
        return a.time_limit is not None and time.perf_counter() - t0 > a.time_limit

    bar = tqdm(total=sum(len([q for q in c.qa if q.category in categories][: a.max_questions]) for c in convs) * len(protocols),
               desc="locomo", dynamic_ncols=True)  # fmt: skip
    runner = LoCoMoRunner(model, tok, batch=a.batch, sampling=sampling, max_new_tokens=a.max_new_tokens, seed=a.seed, log=bar.set_postfix_str)
    with results.open("a") as out:
        for conv in convs:
            questions = [q for q in conv.qa if q.category in categories][: a.max_questions]
            for protocol in protocols:
                skip = {q.index for q in questions if (protocol, conv.sample_id, q.index) in done}
                bar.update(len(skip))
                bar.set_description(f"{conv.sample_id} {protocol}")
                for rec in runner.run(conv, protocol, questions, skip, stop=out_of_time):
                    rec["run_seconds"] = before + time.perf_counter() - t0  # wall time of the whole run so far, resumes included
                    rec["model"], rec["adapter"] = fingerprint["model"], fingerprint["adapter"]
                    records.append(rec)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    bar.update(1)
    bar.close()
    wanted = {(p, c.sample_id, q.index) for c in convs for p in protocols for q in [q for q in c.qa if q.category in categories][: a.max_questions]}
    records = [r for r in records if (r["protocol"], r["sample_id"], r["qa_index"]) in wanted]
    complete = len(records) == len(wanted)
    if not complete:  # compare protocols on the same questions: those every protocol has answered
        answered = [{(r["sample_id"], r["qa_index"]) for r in records if r["protocol"] == p} for p in protocols]
        common = set.intersection(*answered)
        records = [r for r in records if (r["sample_id"], r["qa_index"]) in common]
        print(f"\npartial run ({len(common)} questions answered under every protocol; rerun the command to resume)")
    summary = {
        "command": " ".join(["python scripts/eval_locomo.py", *(sys.argv[1:] if argv is None else argv)]),
        "data": a.data, "adapter": note, "adapter_identity": identity, "sampling": "greedy" if a.greedy else "official (temperature 0.4, top-p 0.9, top-k 10)",
        "conversations": [c.sample_id for c in convs], "categories": sorted(categories), "max_questions": a.max_questions,
        "seconds": before + time.perf_counter() - t0, "complete": complete,
        "conversations_answered": sorted({r["sample_id"] for r in records}),
        "protocols": {p: summarize([r for r in records if r["protocol"] == p]) for p in protocols},
    }  # fmt: skip
    print(f"\nLoCoMo F1 (official metric), adapter {note}, {summary['sampling']}")
    names = [CATEGORY_NAMES[c] for c in CATEGORY_ORDER]
    print(f"{'protocol':<15}" + "".join(f"{n:>13}" for n in names) + f"{'F1 (1-4)':>10}{'n':>6}")
    for p in protocols:
        s = summary["protocols"][p]
        cells = [s["per_category"].get(n) for n in names]
        f1 = "-" if s["f1"] is None else f"{100 * s['f1']:.2f}"
        cells = ["-" if c is None else f"{100 * c['f1']:.2f} ({c['questions']})" for c in cells]
        print(f"{p:<15}" + "".join(f"{c:>13}" for c in cells) + f"{f1:>10}{s['questions']:>6}")
    if "frozen" in protocols and "official" in protocols and summary["protocols"]["frozen"]["f1"]:
        print(f"official ÷ frozen: {summary['protocols']['official']['f1'] / summary['protocols']['frozen']['f1']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
        print(f"summary written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
