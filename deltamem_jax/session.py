"""A conversation whose memory persists across turns, conversations and processes.

Two modes:
- `context+memory` (the official evaluation protocol): the conversation stays in the
  KV cache and every processed token is also written into the memory.
- `memory-only` (what δ-mem is trained for): each turn runs in a fresh context holding
  only the system prompt and that turn; earlier turns live in the memory alone, so the
  context stays short however long the history grows. The system prompt is read, never
  written.

`chat` answers and remembers the exchange; `ask` answers from the memory without
writing anything (the memory and the conversation are left as they were).
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.adapter import attach, load_adapter, memory_of
from deltamem_jax.config import DeltaMemConfig, WriteGranularity
from deltamem_jax.decoding import (
    ContextWindowError, DecodeState, Sampling, bucket, check_context, left_pad, prefill, prompt_length, stream,
)  # fmt: skip
from deltamem_jax.memory import MemoryParam
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from models.decoder import Decoder, KVCache
from models.tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# A trained adapter for the embedded default model, when one is installed here.
DEFAULT_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-instruct-tsw"
SESSION_FORMAT = "deltamem-jax-session/2"  # 2: the KV cache as k [.., h, s], v [.., s, h] (`KVCache`)
_SESSION_FORMAT_1 = "deltamem-jax-session/1"  # k [.., s, h], v [.., h, s]: still loaded


class Mode(str, enum.Enum):
    CONTEXT_AND_MEMORY = "context+memory"
    MEMORY_ONLY = "memory-only"


class Session:
    """A chat with memory on one model (batch 1). All state is arrays plus a few counters."""

    def __init__(
        self,
        model: Decoder,
        tokenizer: Tokenizer,
        mode: Mode | str = Mode.MEMORY_ONLY,
        *,
        system_prompt: str = DEFAULT_SYSTEM,
        max_context: int = 4096,
        max_new_tokens: int = 256,
        sampling: Sampling = Sampling(),
        prefill_segment: int = 1024,
        log: Callable[[str], None] | None = None,
        adapter_note: str = "",
    ):
        self.model, self.tokenizer = model, tokenizer
        self.mode = Mode(mode)
        self.config: DeltaMemConfig = memory_of(model).config
        self.system_prompt = system_prompt
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self.sampling, self.prefill_segment = sampling, prefill_segment
        self.log = log or (lambda s: None)
        self.adapter_note = adapter_note
        self.fingerprint = model_fingerprint(model)
        self.reset()

    @classmethod
    def default(cls, mode: Mode | str = Mode.MEMORY_ONLY, adapter: str | Path | None = None, **kwargs) -> Session:
        """SmolLM2-135M-Instruct (embedded GGUF) with the default δ-mem adapter.

        Uses `adapter` (an official adapter folder) if given, else the trained adapter at
        `DEFAULT_ADAPTER` when present; otherwise a freshly initialized (untrained) TSW
        adapter, and `adapter_note` says so.
        """
        from models.loading import load_gguf

        model, _, tokenizer = load_gguf()
        if adapter is not None:
            load_adapter(model, adapter)
            note = f"adapter {adapter}"
        elif (DEFAULT_ADAPTER / "delta_mem_config.json").is_file():
            load_adapter(model, DEFAULT_ADAPTER)
            note = f"trained adapter {DEFAULT_ADAPTER.name}"
        else:
            attach(model, DeltaMemConfig())
            note = "untrained δ-mem adapter (base-slice init, seed 0): no trained adapter is installed yet"
        return cls(model, tokenizer, mode, adapter_note=note, **kwargs)

    # -- state ----------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets everything: zero memory, empty conversation."""
        self.memory = MemoryState.zeros(self.model.cfg.num_layers, 1, self.config)
        self.cache = KVCache.create(self.model.cfg, 1, self._cache_slots(0)) if self.mode == Mode.CONTEXT_AND_MEMORY else None
        self.history: list[dict[str, str]] = []  # context+memory: the conversation in the cache
        self.fed_text = ""  # context+memory: the rendered text whose tokens are in the cache
        self.position = 0  # context+memory: RoPE position of the next token
        self.next_message_id = 0  # SSW: one id per written message

    # -- public API -----------------------------------------------------------------

    def remember(self, text: str) -> None:
        """Writes `text` (as a user message) into the memory without answering."""
        for _ in self._run_turn({"role": "user", "content": text}, answer=False, write=True):
            pass

    def chat(self, message: str) -> str:
        """Answers `message`; the exchange is written into the memory."""
        return "".join(self.chat_stream(message))

    def ask(self, question: str) -> str:
        """Answers from the memory without writing (nothing of this turn is kept)."""
        return "".join(self._run_turn({"role": "user", "content": question}, answer=True, write=False))

    def chat_stream(self, message: str) -> Iterator[str]:
        """`chat`, yielding the reply's text as it is generated."""
        return self._run_turn({"role": "user", "content": message}, answer=True, write=True)

    # -- turns ----------------------------------------------------------------------

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)

    def _run_turn(self, message: dict, answer: bool, write: bool) -> Iterator[str]:
        system = [{"role": "system", "content": self.system_prompt}]
        cfg, memory = self.model.cfg, self.memory
        if self.mode == Mode.CONTEXT_AND_MEMORY:
            full = self._render(system + self.history + [message], generation_prompt=answer)
            if not full.startswith(self.fed_text):
                raise RuntimeError("the chat template does not extend the conversation in the cache")
            ids = self.tokenizer.encode(full[len(self.fed_text) :])
            check_context(cfg, self.position + len(ids), self.max_new_tokens if answer else 0, "conversation")
            cache = self.cache
            need = int(cache.end) + self._padded_len(ids) + (bucket(self.max_new_tokens) if answer else 0)
            if need > cache.max_len:  # the conversation outgrows its cache: a larger one, up to max_context
                cache = cache.resized(self._cache_slots(need))
            state, cache, memory, position = self._prefill(ids, write, cache, memory, self.position)
        else:
            sys_ids, turn_ids = memory_only_turn(self.tokenizer, self.system_prompt, message, answer)
            if answer:
                check_context(cfg, len(sys_ids) + len(turn_ids), self.max_new_tokens, "message")
            # A turn that is only written may be longer than the context window: it is
            # written piece by piece, each piece in a fresh context after the system prompt.
            window = cfg.max_position_embeddings - len(sys_ids)
            if window <= 0:
                raise ContextWindowError(f"the system prompt ({len(sys_ids)} tokens) fills the {cfg.max_position_embeddings}-token context window")
            for start in range(0, len(turn_ids), window):
                piece = turn_ids[start : start + window]
                room = self._padded_len(sys_ids) + self._padded_len(piece) + (bucket(self.max_new_tokens) if answer else 0)
                cache = KVCache.create(cfg, 1, room)
                _, cache, memory, position = self._prefill(sys_ids, False, cache, memory, 0)
                state, cache, memory, position = self._prefill(piece, write, cache, memory, position)
        reply_ids: list[int] = []
        if answer:
            finals: list[DecodeState] = []
            mode = WriteMode.TOKENS if write else WriteMode.READ_ONLY
            room = state.cache.max_len - int(state.cache.end)
            steps = min(self.max_new_tokens, room)
            if steps <= 0:
                raise ValueError(f"the context is full ({self.max_context} tokens); reset() or use memory-only mode")
            shown = ""
            for chunk in stream(self.model, state, steps, self.tokenizer.eos_ids, self.sampling, chunk=16, write=mode, on_state=finals.append):
                reply_ids += [int(t) for t in chunk[0] if t >= 0]
                text = self.tokenizer.decode(reply_ids)
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown) :]
                    shown = text
            state = finals[0]
            cache, memory = state.cache, state.memory
            position = int(state.positions[0])
        if write:
            self.memory = memory
            if self.mode == Mode.CONTEXT_AND_MEMORY:
                self.cache, self.position = cache, position
                self.fed_text = full + self.tokenizer.decode(reply_ids, skip_special_tokens=False)
                self.history.append(message)
                if answer:
                    self.history.append({"role": "assistant", "content": self.tokenizer.decode(reply_ids)})

    def _cache_slots(self, need: int) -> int:
        """Slots of a context+memory session's KV cache holding `need`: 512, doubled as the
        conversation grows, at most `max_context`. Every decode step attends over all of
        them: a 4,096-slot cache with 64 in use decoded 1.58× slower than a 256-slot one
        (`scripts/ab_cache_slots.py`); each new size compiles once."""
        slots = 512
        while slots < need:
            slots *= 2
        return min(slots, self.max_context)

    def _padded_len(self, ids: list[int]) -> int:
        """Cache slots `_prefill` uses for `ids`."""
        return prompt_length(len(ids), self.prefill_segment)

    def _prefill(self, ids: list[int], write: bool, cache: KVCache, memory: MemoryState, position: int):
        """Feeds token `ids` after `position` (in segments; progress logged for long inputs)."""
        need = self._padded_len(ids)
        if int(cache.end) + need > cache.max_len:
            raise ValueError(
                f"{len(ids)} new tokens (padded to {need}) do not fit: {cache.max_len - int(cache.end)} "
                f"of the {cache.max_len}-token context are left; reset() or use memory-only mode"
            )
        tokens, positions, valid = left_pad([ids], need)
        control = write_control(self.config, valid, self.next_message_id) if write else WriteControl(WriteMode.READ_ONLY)
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:  # `total` counts the left padding too
            self.log(f"prefill {max(0, done - (total - len(ids)))}/{len(ids)} tokens, {time.perf_counter() - t0:.1f} s")

        state = prefill(self.model, tokens, positions + position, valid, cache, memory, control,
                        segment=self.prefill_segment, progress=progress if len(ids) > self.prefill_segment else None)  # fmt: skip
        if write and self.config.write_granularity == WriteGranularity.MESSAGE_MEAN:
            self.next_message_id += 1
        return state, state.cache, state.memory, position + len(ids)

    # -- persistence ----------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Saves the memory (and, in context+memory mode, the KV cache) with orbax, atomically.

        Arrays on a mesh are written shard by shard, each process writing its own."""
        import orbax.checkpoint as ocp

        path = Path(path).absolute()
        arrays = {"memory": self.memory.S}
        if self.cache is not None:  # written at max_context slots (the format's shapes), its own size in meta
            cache = self.cache.stack().resized(self.max_context)  # a CPU decode leaves it per layer
            arrays.update(cache_k=cache.k, cache_v=cache.v, cache_valid=cache.valid, cache_end=cache.end)
        meta = {
            "format": SESSION_FORMAT,
            "fingerprint": self.fingerprint,
            "mode": self.mode.value,
            "system_prompt": self.system_prompt,
            "max_context": self.max_context,
            "cache_slots": None if self.cache is None else self.cache.max_len,
            "history": self.history,
            "fed_text": self.fed_text,
            "position": self.position,
            "next_message_id": self.next_message_id,
        }
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
            ckpt.save(
                path,
                args=ocp.args.Composite(arrays=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        return path

    @classmethod
    def load(cls, path: str | Path, model: Decoder | None = None, tokenizer: Tokenizer | None = None, *, mesh=None, **kwargs) -> Session:
        """Restores a saved session onto `model` (default: `Session.default`'s model).

        A session saved for another backbone or adapter is refused. With `mesh`, the
        memory and KV cache are restored straight onto it (batch on the data axis, KV heads
        as the rules say), whatever mesh or device they were saved from; else onto the
        default device.
        """
        import orbax.checkpoint as ocp

        path = Path(path).absolute()
        if not path.exists():
            raise FileNotFoundError(f"no saved session at {path}")
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
            meta = ckpt.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if meta.get("format") not in (SESSION_FORMAT, _SESSION_FORMAT_1):
                raise ValueError(f"{path} is not a deltamem-jax session")
            old_layout = meta["format"] == _SESSION_FORMAT_1
            if model is None:
                session = cls.default(meta["mode"], system_prompt=meta["system_prompt"], max_context=meta["max_context"], **kwargs)
            else:
                session = cls(model, tokenizer, meta["mode"], system_prompt=meta["system_prompt"], max_context=meta["max_context"], **kwargs)
            if meta["fingerprint"] != session.fingerprint:
                raise ValueError(
                    f"{path} was saved for another backbone or adapter "
                    f"(saved {meta['fingerprint']['model']} / adapter {meta['fingerprint']['adapter'][:12]}, "
                    f"this one {session.fingerprint['model']} / adapter {session.fingerprint['adapter'][:12]})"
                )
            targets = _restore_targets(session, mesh, old_layout)
            arrays = ckpt.restore(path, args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(
                restore_args=jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), targets))))["arrays"]  # fmt: skip
        session.memory = MemoryState(S=arrays["memory"])
        if session.mode == Mode.CONTEXT_AND_MEMORY:
            k, v = arrays["cache_k"], arrays["cache_v"]
            if old_layout:  # saved with k [.., s, h] and v [.., h, s]
                k, v = jnp.swapaxes(k, -1, -2), jnp.swapaxes(v, -1, -2)
            cache = KVCache(k=k, v=v, valid=arrays["cache_valid"], end=arrays["cache_end"])
            slots = meta.get("cache_slots") or session.max_context  # the size it had when saved
            if slots != cache.max_len:
                cache = cache.resized(slots)
                if mesh is not None:
                    from models.sharding import cache_shardings

                    cache = jax.device_put(cache, cache_shardings(cache, mesh))
            session.cache = cache
        session.history = meta["history"]
        session.fed_text = meta["fed_text"]
        session.position = meta["position"]
        session.next_message_id = meta["next_message_id"]
        return session


def _restore_targets(session: Session, mesh, old_layout: bool = False) -> dict:
    """Shapes, dtypes and shardings of a session's saved arrays (its fresh state's, with
    the cache at `max_context` slots; with `old_layout`, a format-1 file's, whose cache k
    and v had their last two axes swapped)."""
    from jax.sharding import SingleDeviceSharding

    memory, cache = session.memory, None
    if session.cache is not None:
        cache = jax.eval_shape(lambda: KVCache.create(session.model.cfg, 1, session.max_context))
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        memory_sh = MemoryState(S=device)
        cache_sh = None if cache is None else KVCache(k=device, v=device, valid=device, end=device)
    else:
        from deltamem_jax.sharding import memory_shardings
        from models.sharding import cache_shardings

        memory_sh = memory_shardings(memory, mesh)
        cache_sh = None if cache is None else cache_shardings(cache, mesh)
    out = {"memory": jax.ShapeDtypeStruct(memory.S.shape, memory.S.dtype, sharding=memory_sh.S)}
    if cache is not None:
        for name in ("k", "v", "valid", "end"):
            x = getattr(cache, name)
            shape = (*x.shape[:-2], x.shape[-1], x.shape[-2]) if old_layout and name in ("k", "v") else x.shape
            out[f"cache_{name}"] = jax.ShapeDtypeStruct(shape, x.dtype, sharding=getattr(cache_sh, name))
    return out


def memory_only_turn(tokenizer: Tokenizer, system_prompt: str, message: dict, generation_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids of one memory-only turn: the system segment (read, never written) and the turn.

    The turn is rendered by the chat template after the system message, with the
    assistant's generation prompt when an answer follows. Training renders its episodes
    with this function too, so what it writes is exactly what a session writes.
    """
    system = [{"role": "system", "content": system_prompt}]
    sys_text = tokenizer.apply_chat_template(system, add_generation_prompt=False)
    full = tokenizer.apply_chat_template(system + [message], add_generation_prompt=generation_prompt)
    if not full.startswith(sys_text):
        raise RuntimeError("the chat template does not start with its system message")
    return tokenizer.encode(sys_text), tokenizer.encode(full[len(sys_text) :])


def write_control(config: DeltaMemConfig, valid: jax.Array, message_id: int | jax.Array = 0) -> WriteControl:
    """How a written segment uses the memory: per-token writes, or (SSW) one message per segment."""
    if config.write_granularity == WriteGranularity.MESSAGE_MEAN:
        return WriteControl.messages(jnp.where(valid, message_id, -1), valid)
    return WriteControl(WriteMode.TOKENS)


def model_fingerprint(model: Decoder) -> dict[str, str]:
    """Identifies the backbone (config + a sample of weights) and the adapter (all of it)."""
    import dataclasses

    identity = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "attention"}  # a runtime choice
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for w in (model.embed[...][:256], model.final_norm[...], model.layers.input_norm[...]):
        h.update(np.asarray(w, np.float32).tobytes())
    a = hashlib.sha256(json.dumps(memory_of(model).config.to_official(), sort_keys=True).encode())
    for leaf in jax.tree.leaves(nnx.state(model, MemoryParam)):
        a.update(np.asarray(leaf, np.float32).tobytes())
    return {"model": f"{model.cfg.family}-{model.cfg.num_layers}x{model.cfg.hidden_size}-{h.hexdigest()[:16]}", "adapter": a.hexdigest()}


__all__ = ["Mode", "Session", "memory_only_turn", "model_fingerprint", "write_control"]
