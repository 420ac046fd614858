"""The `deltamem-jax` command: generate, chat, demo, train."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from deltamem_jax.decoding import Sampling


def _sampling(args) -> Sampling:
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _is_gguf(model: str | None) -> bool:
    return model is None or str(model).endswith(".gguf")


def load_metadata(model: str | None = None):
    """(config, tokenizer, GGUF checkpoint or None) of a HF folder or a GGUF file, without its
    weights: enough to refuse a prompt that does not fit before the weights are read. Pass
    the checkpoint on to `load_backbone`, so a GGUF's metadata is parsed once."""
    from models.config import ModelConfig
    from models.gguf import read_gguf
    from models.tokenizer import Tokenizer

    if _is_gguf(model):
        checkpoint = read_gguf(model, load_tensors=False)
        return ModelConfig.from_hf(checkpoint.config), Tokenizer.from_gguf(checkpoint), checkpoint
    return ModelConfig.load(model), Tokenizer.from_pretrained(model), None


def load_backbone(model: str | None = None, dtype: str = "float32", attention: str = "auto", checkpoint=None):
    """(model, tokenizer) from a HF folder or a GGUF file (default: embedded SmolLM2);
    `attention` as `ModelConfig.attention`; `checkpoint` a GGUF's, from `load_metadata`."""
    from models.loading import load_gguf, load_pretrained
    from models.tokenizer import Tokenizer

    if _is_gguf(model):
        backbone, _, tok = load_gguf(model, dtype=dtype, attention=attention, checkpoint=checkpoint)
    else:
        backbone, _ = load_pretrained(model, dtype=dtype, attention=attention)
        tok = Tokenizer.from_pretrained(model)
    return backbone, tok


def _attach(model, args) -> str:
    from deltamem_jax.adapter import attach, load_adapter
    from deltamem_jax.config import DeltaMemConfig
    from deltamem_jax.session import DEFAULT_ADAPTER

    if args.no_memory:
        return "no δ-mem (plain backbone)"
    # the installed default adapter was trained for the embedded model only
    default = DEFAULT_ADAPTER if args.model is None and (DEFAULT_ADAPTER / "delta_mem_config.json").is_file() else None
    folder = args.adapter or default
    if folder is not None:
        load_adapter(model, folder)
        return f"adapter {folder}"
    attach(model, DeltaMemConfig())
    why = "no trained adapter installed" if args.model is None else "no --adapter given for this model"
    return f"untrained δ-mem adapter (base-slice init): {why}"


PROGRESS_FROM = 2048  # prompts longer than this show a prefill progress bar


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from deltamem_jax import distributed
    from deltamem_jax.decoding import check_context, generate
    from models.sharding import shard_model

    distributed.initialize(args)
    cfg, tok, checkpoint = load_metadata(args.model)
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) if args.chat else tok.encode(p) for p in args.prompt]
    longest = max(len(p) for p in prompts)
    check_context(cfg, longest, args.max_new_tokens)  # before the weights are read
    model, tok = load_backbone(args.model, checkpoint=checkpoint)
    note = _attach(model, args)
    mesh = distributed.mesh(args)
    if mesh is not None:  # every process runs the same generation; process 0 prints it
        shard_model(model, mesh)
        note += f"; sharded over a {mesh.shape['data']}×{mesh.shape['model']} mesh"
    main = distributed.is_main()
    if main:
        print(f"[{note}]", file=sys.stderr)
    t0 = time.perf_counter()
    bar = tqdm(total=longest, desc="prefill", unit="tok", file=sys.stderr) if longest > PROGRESS_FROM and main else None

    def progress(done: int, total: int) -> None:  # the padded total includes left padding
        bar.n = max(0, min(longest, done - (total - longest)))
        bar.refresh()
        if done >= total:  # its time and rate are the prefill's, not the decode's after it
            bar.close()

    replies, _ = generate(model, prompts, args.max_new_tokens, stop_ids=tok.eos_ids, sampling=_sampling(args),
                          seed=args.seed, progress=progress if bar else None)  # fmt: skip
    if bar:
        bar.close()
    dt = time.perf_counter() - t0
    if not main:
        return 0
    for p, r in zip(args.prompt, replies):
        print(f"> {p}\n{tok.decode(r)}\n")
    n = sum(len(r) for r in replies)
    print(f"[{n} tokens in {dt:.1f} s including compilation]", file=sys.stderr)
    return 0


def _session(args):
    from deltamem_jax.session import Session

    kw = dict(max_new_tokens=args.max_new_tokens, sampling=_sampling(args), log=lambda s: print(f"[{s}]", file=sys.stderr))
    if args.session and Path(args.session).exists():
        s = Session.load(args.session, **kw)
        print(f"[restored session {args.session}: mode {s.mode.value}]", file=sys.stderr)
        return s
    return Session.default(args.mode, **kw)


def cmd_chat(args) -> int:
    s = _session(args)
    print(f"[{s.adapter_note}; mode {s.mode.value}; /remember TEXT, /ask Q, /reset, /quit]", file=sys.stderr)
    try:
        for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), None):
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                s.reset()
                print("[memory cleared]")
            elif line.startswith("/remember "):
                s.remember(line[len("/remember ") :])
                print("[remembered]")
            elif line.startswith("/ask "):
                print("assistant> " + s.ask(line[len("/ask ") :]))
            else:
                print("assistant> ", end="", flush=True)
                for piece in s.chat_stream(line):
                    print(piece, end="", flush=True)
                print()
            if args.session:
                s.save(args.session)
    except (EOFError, KeyboardInterrupt):
        pass
    if args.session:
        print(f"[session saved to {s.save(args.session)}]", file=sys.stderr)
    return 0


# What the default adapter was trained to recall: numbers and dates (docs/RESULTS.md,
# stage 5 onward). The values are from the held-out split, never seen in training, and were
# fixed before the adapter was first evaluated.
DEMO_FACTS = ["My door code is 2472.", "My locker number is 536.", "My birthday is March 14.", "My dentist appointment is Monday at 4 pm."]
DEMO_QUESTIONS = ["What is my door code?", "What is my locker number?", "When is my birthday?", "When is my dentist appointment?"]
# The same facts with other values: an adapter that answers a told value from this memory
# too has learned a favourite answer, not the memory's content (the mismatched control).
DEMO_OTHER_FACTS = ["My door code is 1741.", "My locker number is 731.", "My birthday is November 23.",
                    "My dentist appointment is Thursday at 7 pm."]  # fmt: skip


def _told(fact: str) -> str:
    """The value a demo fact tells ("My door code is 2472." → "2472")."""
    return fact.rstrip(".").split(" is ", 1)[1]


def cmd_demo(args) -> int:
    from deltamem_jax.session import Session

    out = Path(args.session or tempfile.mkdtemp(prefix="deltamem-demo-")) / "session"
    t0 = time.perf_counter()
    s = Session.default("memory-only", adapter=args.adapter, max_new_tokens=args.max_new_tokens)
    print(f"Model: SmolLM2-135M-Instruct (embedded GGUF) with {s.adapter_note}.")
    print(f"Mode: memory-only (each turn has a fresh context; earlier turns live only in the memory). Loaded in {time.perf_counter() - t0:.1f} s.\n")
    print("Session 1: telling the model some facts (written into the memory, no answers).")
    for fact in DEMO_FACTS:
        t = time.perf_counter()
        s.remember(fact)
        print(f"  remembered: {fact!r} ({time.perf_counter() - t:.1f} s)")
    s.save(out)
    import numpy as np

    norms = np.linalg.norm(np.asarray(s.memory.S), axis=(-2, -1)).mean()
    print(f"  saved the session to {out} (mean per-layer ‖S‖ = {norms:.3f})\n")
    model, tok, note = s.model, s.tokenizer, s.adapter_note
    del s
    print("Session 2: a fresh session loaded from disk; the facts are only in its memory.")
    s = Session.load(out, model, tok, max_new_tokens=args.max_new_tokens, adapter_note=note)
    blank = Session(s.model, s.tokenizer, "memory-only", max_new_tokens=args.max_new_tokens)
    other = Session(s.model, s.tokenizer, "memory-only", max_new_tokens=args.max_new_tokens)
    for fact in DEMO_OTHER_FACTS:
        other.remember(fact)
    recalled = {"memory": 0, "another memory (control)": 0, "empty memory (control)": 0}
    other_own = 0  # the control memory's own (other) values in its answers: recall runs both ways
    for q, fact, other_fact in zip(DEMO_QUESTIONS, DEMO_FACTS, DEMO_OTHER_FACTS):
        value = _told(fact)
        t = time.perf_counter()
        answers = {"memory": s.ask(q).strip(), "another memory (control)": other.ask(q).strip(), "empty memory (control)": blank.ask(q).strip()}
        for k, a in answers.items():
            recalled[k] += value.lower() in a.lower()
        other_own += _told(other_fact).lower() in answers["another memory (control)"].lower()
        print(f"  Q: {q}  ({time.perf_counter() - t:.1f} s)")
        for k, a in answers.items():
            print(f"  A ({k}): {a}")
    print("\nTold values found in the answers: " + ", ".join(f"{k} {v}/{len(DEMO_QUESTIONS)}" for k, v in recalled.items()))
    print("(another memory holds the same facts with other values: a told value found there too is the adapter's favourite answer, not recall)")
    print(f"The other memory's own values found in its answers: {other_own}/{len(DEMO_QUESTIONS)}")
    if "untrained" in s.adapter_note:
        print("Note: the adapter is untrained, so recall from memory is not expected.")
    print(f"\nDone in {time.perf_counter() - t0:.1f} s.")
    return 0


def main(argv=None) -> int:
    from deltamem_jax import distributed

    p = argparse.ArgumentParser(prog="deltamem-jax", description="δ-mem on frozen LLMs, in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--max-new-tokens", type=int, default=128)
        sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        sp.add_argument("--top-k", type=int, default=0)
        sp.add_argument("--top-p", type=float, default=1.0)

    g = sub.add_parser("generate", help="generate replies for prompts")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--model", help="a Hugging Face folder or a .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--adapter", help="an official δ-mem adapter folder")
    g.add_argument("--no-memory", action="store_true", help="run the plain backbone")
    g.add_argument("--raw", dest="chat", action="store_false", help="no chat template")
    g.add_argument("--seed", type=int, default=0)
    common(g)
    distributed.add_arguments(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat whose memory persists across turns")
    c.add_argument("--mode", choices=["memory-only", "context+memory"], default="memory-only")
    c.add_argument("--session", help="a session folder: restored if it exists, saved after every turn")
    common(c)
    c.set_defaults(fn=cmd_chat)

    d = sub.add_parser("demo", help="tell facts, save, reload, ask: memory across sessions")
    d.add_argument("--session", help="folder for the saved session (default: a temp folder)")
    d.add_argument("--adapter", help="an official δ-mem adapter folder (default: the installed one)")
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.set_defaults(fn=cmd_demo)

    from deltamem_jax.training import cli as train_cli

    t = sub.add_parser("train", help="train a δ-mem adapter on personal-memory episodes (resumable)")
    train_cli.add_arguments(t)
    t.set_defaults(fn=train_cli.run)

    args = p.parse_args(argv)
    from deltamem_jax.decoding import ContextWindowError

    try:
        return args.fn(args)
    except ContextWindowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
