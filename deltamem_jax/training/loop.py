"""The training loop: data position → batch → step, with resumable orbax checkpoints.

A run lives in one folder: `checkpoints/` (orbax: memory parameters, optimizer state,
data position; the last `keep` kept, written atomically by orbax so a half-written one is
never picked up), `metrics.jsonl` (one record per step, plus held-out recall probes),
`training_curves.png` and `adapter/` (the official adapter folder with
`training_metadata.json`). Rerunning the same command resumes where it stopped and
reproduces the same losses: episode i of the stream is a pure function of (seed, i).

On a `mesh` (one process or several: `deltamem_jax.distributed`) the step is the same,
compiled with explicit shardings (`training/sharded.py`); each process renders only its
rows of every batch, writes its own checkpoint shards, and process 0 writes the logs and
the adapter. A checkpoint resumes onto any mesh, or onto one device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.adapter import attach, load_adapter, memory_of, save_adapter
from deltamem_jax.config import DeltaMemConfig
from deltamem_jax.session import model_fingerprint
from deltamem_jax.training.batches import PROTOCOLS, Layout, Renderer
from deltamem_jax.training.data import EpisodeConfig, episodes
from deltamem_jax.training.plain import load_or_build, transcripts
from deltamem_jax.training.sharded import init_opt_state, make_sharded_train_step, process_batch, train_shardings
from deltamem_jax.training.step import BETA_WEIGHT, OptimConfig, make_optimizer, make_recall_probe, make_train_step, split_model
from models.sharding import gather, shard_model

METADATA_FILE = "training_metadata.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    protocol: str = "session"  # session | official
    batch_size: int = 8  # episodes per micro-batch
    seed: int = 0  # data (and adapter init) seed
    optim: OptimConfig = OptimConfig()
    episodes: EpisodeConfig = EpisodeConfig()
    layout: Layout = Layout()
    memory: DeltaMemConfig = DeltaMemConfig()
    remat: bool = True
    checkpoint_every: int = 25  # micro-steps
    keep: int = 3
    eval_every: int = 50  # micro-steps; 0 = never
    eval_episodes: int = 32
    value_weight: float = 1.0  # loss weight of the told value's answer tokens (1 = plain answer CE)
    beta_weight: float = BETA_WEIGHT  # weight of the write-gate regularizer (official: 0.01)
    plain_weight: float = 0.0  # weight of the plain-text KL to the frozen backbone (`plain.py`); 0 = off
    plain_len: int = 256  # tokens of each plain transcript (one per episode row)
    context_weight: float = 0.0  # weight of the answer loss with the episode in context+memory mode (`step.context_ce`); 0 = off

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")

    @property
    def total_micro_steps(self) -> int:
        return self.optim.steps * self.optim.accumulate

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["memory"] = {**self.memory.to_official(), "writer": self.memory.writer}
        return json.loads(json.dumps(d, default=str))

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        d = dict(d)
        return cls(
            **{k: v for k, v in d.items() if k not in ("optim", "episodes", "layout", "memory")},
            optim=OptimConfig(**d["optim"]), episodes=EpisodeConfig(**d["episodes"]), layout=Layout(**d["layout"]),
            memory=dataclasses.replace(DeltaMemConfig.from_official({k: v for k, v in d["memory"].items() if k != "writer"}),
                                       writer=d["memory"].get("writer", "auto")),
        )  # fmt: skip


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "-uno"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _manager(folder: Path, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        folder.absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        item_names=("state", "meta"),
    )


def _save(mgr, step: int, params, opt_state, meta: dict) -> None:
    import orbax.checkpoint as ocp

    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                                           meta=ocp.args.JsonSave(meta)))  # fmt: skip
    mgr.wait_until_finished()


def _restore(mgr, params, opt_state, expect: dict) -> tuple[Any, Any, int]:
    """Latest checkpoint onto (params, opt_state); refuses one made for another run setup."""
    import orbax.checkpoint as ocp

    step = mgr.latest_step()
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    defaults, config = TrainConfig().to_json(), meta.get("config", {})
    config = {k: {**defaults[k], **v} if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v for k, v in config.items()}
    saved = {"backbone": meta.get("backbone"), "config": {**defaults, **config}}  # fields added later take their defaults
    for key in ("backbone", "config"):
        if saved[key] != expect[key]:
            raise ValueError(
                f"checkpoint {mgr.directory}/{step} was made with another {key}:\n  saved: {saved[key]}\n  now:   {expect[key]}\n"
                "use a new output folder, or the same settings to resume"
            )
    # restored straight onto where `params` and `opt_state` live now: one device, or any mesh
    # (each process reading only its shards), whatever mesh the checkpoint was saved from
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), {"params": params, "opt_state": opt_state})
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    return state["params"], state["opt_state"], int(meta["micro_step"])


def _log_records(path: Path, upto: int) -> list[dict]:
    """Existing metric records up to micro-step `upto` (later ones belong to a lost tail)."""
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if r["step"] <= upto]


def train(
    config: TrainConfig,
    out: str | Path,
    model,
    tokenizer,
    *,
    init_adapter: str | Path | None = None,
    stop_after: int | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    command: str | None = None,
    mesh=None,
) -> dict:
    """Trains the memory of `model` (a backbone; δ-mem is attached here) and exports the adapter.

    Resumes from `out/checkpoints` when present. `stop_after` micro-steps or `time_limit`
    seconds end this invocation early (after a checkpoint), as an interruption would.
    `mesh` (a `models.make_mesh` mesh) trains data- and tensor-parallel on it.
    Returns a summary (steps done, last losses, where the adapter is).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    renderer = Renderer(tokenizer, config.layout)
    # the KL term's transcripts are the backbone's own replies: made before δ-mem is attached
    corpus = load_or_build(out, model, tokenizer, renderer.system_prompt, config.seed) if config.plain_weight > 0 else None
    if init_adapter is not None:
        load_adapter(model, init_adapter)
        have, want = memory_of(model).config.to_official(), config.memory.to_official()
        if have != want:
            diff = ", ".join(f"{k}: adapter {have[k]!r}, run {want.get(k)!r}" for k in have if have[k] != want.get(k))
            raise ValueError(f"{init_adapter} has another δ-mem config than this run's ({diff}); pass the adapter's settings, e.g. --rank")
    else:
        attach(model, config.memory, seed=config.seed)
    expect = {"backbone": model_fingerprint(model)["model"], "config": config.to_json()}
    B = config.batch_size

    def render(split: str, seed: int, first: int, count: int):
        """Episodes [first, first+count) rendered (with their plain transcripts when the KL term is on)."""
        batch = renderer.batch(episodes(seed, split, first, count, config.episodes), config.protocol, context=config.context_weight > 0)
        return batch if corpus is None else batch.replace(plain=transcripts(corpus, seed, first, count, config.plain_len))

    def batch_of(split: str, seed: int, first: int, rows: int):
        """Rows [first, first+rows); on a mesh each process renders only its own rows."""
        if mesh is None:
            return render(split, seed, first, rows)
        return process_batch(lambda start, count: render(split, seed, first + start, count), rows, mesh)

    tx = make_optimizer(config.optim)
    step_options = dict(remat=config.remat, value_weight=config.value_weight, beta_weight=config.beta_weight, plain_weight=config.plain_weight,
                        context_weight=config.context_weight)  # fmt: skip
    if mesh is None:
        graphdef, params, frozen = split_model(model)
        opt_state = tx.init(params)
        step_fn = make_train_step(graphdef, tx, **step_options)
    else:
        shard_model(model, mesh)
        graphdef, params, frozen = split_model(model)
        one = render("train", config.seed, 0, 1)
        shardings = train_shardings(tx, params, frozen, jax.tree.map(lambda x: jax.ShapeDtypeStruct((B, *x.shape[1:]), x.dtype), one), mesh)
        opt_state = init_opt_state(tx, params, shardings)
        step_fn = make_sharded_train_step(graphdef, tx, shardings, **step_options)
    probe_fn = make_recall_probe(graphdef)
    main = jax.process_index() == 0  # writes the logs, the plot and the adapter
    mgr = _manager(out, config.keep)
    start = 0
    if mgr.latest_step() is not None:
        params, opt_state, start = _restore(mgr, params, opt_state, expect)
    metrics_path = out / "metrics.jsonl"
    records = _log_records(metrics_path, start)
    if main:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    total = config.total_micro_steps
    end = total if stop_after is None else min(total, start + stop_after)
    eval_batch = batch_of("eval", config.seed + 1, 0, config.eval_episodes) if config.eval_every else None
    t_start, commit = time.perf_counter(), git_commit()  # the code this invocation runs
    bar = tqdm(total=total, initial=start, desc="train", disable=not (progress and main), dynamic_ncols=True)
    step = start
    last: dict = {}
    with metrics_path.open("a") if main else open(os.devnull, "w") as log:
        while step < end:
            batch = batch_of("train", config.seed, step * B, B)
            t0 = time.perf_counter()
            params, opt_state, m = step_fn(params, opt_state, frozen, batch)
            m = {k: float(v) for k, v in m.items()}
            dt = time.perf_counter() - t0
            step += 1
            tokens = batch.tokens()
            last = {"step": step, **m, "seconds": dt, "tokens_per_s": tokens / dt, "episodes": step * B}
            log.write(json.dumps(last) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tokens / dt:.0f}")
            if config.eval_every and (step % config.eval_every == 0 or step == total):
                probe = {k: float(v) for k, v in probe_fn(params, frozen, eval_batch).items()}
                log.write(json.dumps({"step": step, "eval": probe}) + "\n")
                bar.write(f"step {step}: held-out CE, answer / value tokens: matched {probe['matched']:.3f} / {probe['value_matched']:.3f}"
                          f" | other {probe['other']:.3f} / {probe['value_other']:.3f} | empty {probe['empty']:.3f} / {probe['value_empty']:.3f}"
                          + (f" | plain KL {probe['plain_kl']:.4f}" if "plain_kl" in probe else "")
                          + (f" | context+memory {probe['context']:.3f} / {probe['value_context']:.3f}" if "context" in probe else ""))
            log.flush()
            timed_out = time_limit is not None and time.perf_counter() - t_start > time_limit
            if step % config.checkpoint_every == 0 or step == end or timed_out:
                _save(mgr, step, params, opt_state, {**expect, "micro_step": step, "episodes_seen": step * B, "data_seed": config.seed})
            if timed_out:
                break
    bar.close()
    # the adapter of the latest parameters, in the official format
    nnx.update(model, jax.tree.map(jnp.asarray, gather(params)) if mesh is not None else params)
    summary = {"steps": step, "total": total, "last": last, "adapter": str(out / "adapter")}
    if not main:
        return summary
    adapter = save_adapter(model, out / "adapter")
    meta = {
        "command": command or " ".join(sys.argv),
        "data_seed": config.seed,
        "micro_steps": step,
        "optimizer_updates": step // config.optim.accumulate,
        "episodes_seen": step * B,
        "final_loss": last.get("loss"),
        "git_commit": commit,
        "backbone": expect["backbone"],
        "train_config": expect["config"],
        "finished": step >= total,
    }
    (adapter / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    plot_curves(metrics_path, out / "training_curves.png")
    return summary


def plot_curves(metrics: Path, png: Path) -> None:
    """Training loss (and its running mean), the plain-text KL and context+memory terms when
    trained with them, and the held-out recall probes, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval" in r]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["ce"] for r in train])
        k = max(1, len(loss) // 50)
        ax[0].plot(steps, loss, alpha=0.3, label="answer CE (batch)")
        ax[0].plot(steps[k - 1 :], np.convolve(loss, np.ones(k) / k, "valid"), label=f"running mean ({k})")
        if all("plain_kl" in r for r in train):  # the run trained with the plain-text KL term
            ax[0].plot(steps, [r["plain_kl"] for r in train], label="plain-text KL to the frozen model (batch)")
        if all("context_ce" in r for r in train):  # and with the context+memory term
            ax[0].plot(steps, [r["context_ce"] for r in train], alpha=0.5, label="answer CE in context+memory mode (batch)")
        ax[0].legend()
    ax[0].set(xlabel="micro-step", ylabel="nats per token", title="training")
    if evals:
        steps = [r["step"] for r in evals]
        for key in ("matched", "other", "empty"):
            ax[1].plot(steps, [r["eval"][key] for r in evals], marker="o", label=f"{key} memory")
        if all("context" in r["eval"] for r in evals):
            ax[1].plot(steps, [r["eval"]["context"] for r in evals], marker="s", label="context+memory")
        ax[1].legend()
    ax[1].set(xlabel="micro-step", ylabel="held-out answer CE", title="recall probe (matched vs another episode's memory)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


__all__ = ["TrainConfig", "git_commit", "plot_curves", "train"]
