"""`deltamem-jax train` / `python scripts/train.py`: train a δ-mem adapter on personal-memory episodes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from models.config import ATTENTION

    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, plot, adapter); rerun to resume")
    p.add_argument("--model", help="HF checkpoint folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="backbone dtype (float32 on CPU: XLA CPU bf16 matmuls are ~8x slower)")
    p.add_argument("--attention", default="auto", choices=ATTENTION,
                   help="prompt attention: auto = cuDNN's fused kernel on a GPU with --dtype bfloat16, else blockwise")
    p.add_argument("--protocol", default="session", choices=["session", "official"])
    p.add_argument("--steps", type=int, default=2000, help="optimizer updates")
    p.add_argument("--batch-size", type=int, default=8, help="episodes per micro-batch")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per update")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sub-states", type=int, default=1, help="1 = TSW/SSW, 4 = MSW")
    p.add_argument("--granularity", default="token", choices=["token", "message_mean"], help="message_mean = SSW")
    p.add_argument("--branches", default="q,o", help="corrected projections, e.g. q,o or q,k,v,o")
    p.add_argument("--layers", default="all", help="layers that carry memory: all, first, middle, last (a third each) or indices, e.g. 0,5,9")
    p.add_argument("--update-mode", default="standard", choices=["standard", "no_lambda", "lambda_outside"], help="the delta rule's form (spec §2)")
    p.add_argument("--min-facts", type=int, default=1)
    p.add_argument("--max-facts", type=int, default=6)
    p.add_argument("--max-chitchat", type=int, default=2, help="chit-chat turns per episode (at most)")
    p.add_argument("--update-rate", type=float, default=0.15, help="share of episodes whose asked fact is updated")
    p.add_argument("--never-said-rate", type=float, default=0.1, help="share of questions about something never said")
    p.add_argument("--relations", default="", help="comma-separated relation kinds to train on (a curriculum; default: all), e.g. door_code,locker")
    p.add_argument("--turn-len", type=int, default=32)
    p.add_argument("--value-weight", type=float, default=1.0, help="loss weight of the answer tokens that spell the told value")
    p.add_argument("--beta-weight", type=float, default=0.01, help="weight of the write-gate regularizer w·mean_l(mean β_l − 0.05)² (official 0.01)")
    p.add_argument("--plain-weight", type=float, default=0.0,
                   help="weight of the KL to the frozen backbone on plain chat transcripts run in context and written into memory (0 = off)")
    p.add_argument("--plain-len", type=int, default=256, help="tokens of each plain transcript (one per episode)")
    p.add_argument("--context-len", type=int, default=256, help="padded tokens of an episode in one context (the --context-weight term)")
    p.add_argument("--context-weight", type=float, default=0.0,
                   help="weight of the answer loss with the whole episode in the context and written into memory (context+memory mode; 0 = off)")
    p.add_argument("--no-remat", action="store_true", help="keep activations instead of recomputing each layer")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-episodes", type=int, default=32)
    p.add_argument("--init-adapter", help="start from this adapter folder instead of a fresh init")
    p.add_argument("--stop-after", type=int, help="end this invocation after N micro-steps (resumable)")
    p.add_argument("--time-limit", type=float, help="end this invocation after N seconds (resumable)")
    p.add_argument("--install-default", action="store_true", help="copy the exported adapter to the package's default adapter folder")
    from deltamem_jax import distributed

    distributed.add_arguments(p)


def target_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """`all` → () (every layer); `first` / `middle` / `last` → that third; else indices."""
    third = num_layers // 3
    named = {"all": (), "first": tuple(range(third)), "middle": tuple(range(third, num_layers - third)),
             "last": tuple(range(num_layers - third, num_layers))}  # fmt: skip
    if spec in named:
        return named[spec]
    try:
        layers = tuple(sorted({int(x) for x in spec.split(",")}))
    except ValueError:
        raise ValueError(f"--layers must be all, first, middle, last or comma-separated indices, got {spec!r}") from None
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"--layers {spec!r}: indices must lie in 0..{num_layers - 1}")
    return layers


def config_from_args(a, num_layers: int) -> "TrainConfig":
    from deltamem_jax.config import DeltaMemConfig
    from deltamem_jax.training.batches import Layout
    from deltamem_jax.training.data import EpisodeConfig, parse_relations
    from deltamem_jax.training.loop import TrainConfig
    from deltamem_jax.training.step import OptimConfig

    episodes = EpisodeConfig(min_facts=a.min_facts, max_facts=a.max_facts, max_chitchat=a.max_chitchat,
                             update_rate=a.update_rate, never_said_rate=a.never_said_rate,
                             relations=parse_relations(a.relations))
    return TrainConfig(
        protocol=a.protocol, batch_size=a.batch_size, seed=a.seed,
        optim=OptimConfig(learning_rate=a.lr, steps=a.steps, warmup=a.warmup, weight_decay=a.weight_decay, clip=a.clip, accumulate=a.accumulate),
        episodes=episodes, layout=Layout(max_turns=episodes.max_turns, turn_len=a.turn_len, context_len=a.context_len),
        memory=DeltaMemConfig(rank=a.rank, num_state_heads=a.sub_states, write_granularity=a.granularity, branches=tuple(a.branches.split(",")),
                              update_mode=a.update_mode, target_layers=target_layers(a.layers, num_layers)),
        remat=not a.no_remat, checkpoint_every=a.checkpoint_every, keep=a.keep, eval_every=a.eval_every, eval_episodes=a.eval_episodes, value_weight=a.value_weight,
        beta_weight=a.beta_weight, plain_weight=a.plain_weight, plain_len=a.plain_len, context_weight=a.context_weight,
    )  # fmt: skip


def run(a) -> int:
    import shutil

    from deltamem_jax import distributed
    from deltamem_jax.cli import load_backbone
    from deltamem_jax.session import DEFAULT_ADAPTER
    from deltamem_jax.training.loop import train

    distributed.initialize(a)  # every process runs this same command; process 0 reports
    model, tok = load_backbone(a.model, a.dtype, a.attention)
    config = config_from_args(a, model.cfg.num_layers)
    command = "deltamem-jax train " + " ".join(shlex.quote(x) for x in sys.argv[2 if sys.argv[1:2] == ["train"] else 1 :])
    summary = train(config, a.out, model, tok, init_adapter=a.init_adapter, stop_after=a.stop_after, time_limit=a.time_limit,
                    command=command, mesh=distributed.mesh(a))  # fmt: skip
    if not distributed.is_main():
        return 0
    print(json.dumps(summary, indent=2, default=str))
    if a.install_default:
        if summary["steps"] < summary["total"]:
            print("not installing: the run has not finished", file=sys.stderr)
            return 1
        shutil.rmtree(DEFAULT_ADAPTER, ignore_errors=True)
        shutil.copytree(summary["adapter"], DEFAULT_ADAPTER)
        print(f"installed as the default adapter: {DEFAULT_ADAPTER}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


__all__ = ["add_arguments", "config_from_args", "main", "run", "target_layers"]
