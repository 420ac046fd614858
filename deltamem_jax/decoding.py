"""Generation with memory: bucketed, segmented prefill, and a `lax.scan` decode loop.

Long prompts are fed in segments of `PREFILL_SEGMENT` tokens against the KV cache (one
compiled shape per segment size), their attention computed blockwise, so prefill memory
stays linear in the prompt length. Prompt + new tokens must fit the model's context
window (`ContextWindowError` otherwise): no token is ever given a RoPE position the
model was not trained on.

Every processed token is written into the memory exactly once: the prompt by the
prefill, each generated token by the decode step that feeds it (the step that samples a
token also feeds it, so the last token of a reply is written too). Prompts of a batch
are left-padded; padding neither attends, is attended to, nor writes.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from deltamem_jax.forward import forward, jit_for_backend, keep_shardings, placed_shardings
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from models.decoder import Decoder, KVCache, LayerBuffers, split_layers
from models.sharding import gather


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Token choice. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}")


def greedy(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` (the first maximum; the first NaN if any) as a max and a
    min over the vocabulary: XLA CPU runs argmax's paired value-index reduction 3–4× slower
    (219 against 58 µs for b=1 over 49,152 logits on the AMD EPYC, 926 against 298 µs for
    b=8: `scripts/ab_greedy.py`), a cost of every greedy decode step."""
    v = logits.shape[-1]
    m = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == m) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """One token per row from logits `[b, v]`."""
    if s.temperature == 0.0:
        return greedy(logits)
    logits = logits.astype(jnp.float32) / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = jnp.cumsum(probs, axis=-1) - probs < s.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def bucket(n: int) -> int:
    """Padded prompt length: powers of two up to 256, then multiples of 256."""
    if n <= 256:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 256) * 256


PREFILL_SEGMENT = 1024  # prompts longer than this are prefilled in segments of this size


class ContextWindowError(ValueError):
    """Prompt + new tokens do not fit the model's context window."""


def check_context(cfg, prompt_tokens: int, max_new_tokens: int = 0, what: str = "prompt") -> None:
    """Refuses positions past the trained RoPE range (`cfg.max_position_embeddings`)."""
    window = cfg.max_position_embeddings
    if prompt_tokens + max_new_tokens > window:
        raise ContextWindowError(
            f"{what} of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = {prompt_tokens + max_new_tokens} "
            f"tokens exceeds the model's context window of {window} tokens; shorten it or lower max_new_tokens"
        )


def prompt_length(n: int, segment: int = PREFILL_SEGMENT) -> int:
    """Padded length of an `n`-token prompt: `bucket(n)` up to one segment, else whole
    segments (so every segment of a long prompt has the same compiled shape)."""
    return bucket(n) if n <= segment else -(-n // segment) * segment


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """Token ids, RoPE positions (from 0) and validity `[b, length]` for left-padded prompts."""
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    valid = np.zeros((b, length), bool)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than {length}")
        if len(p):
            tokens[i, length - len(p) :] = p
            valid[i, length - len(p) :] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid)


MAX_STOP_IDS = 8


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries, as arrays (nothing recompiles per step)."""

    cache: KVCache
    memory: MemoryState | None
    logits: jax.Array  # [b, v] float32: logits for the next token
    positions: jax.Array  # [b] int32: RoPE position of the next token
    key: jax.Array
    done: jax.Array  # [b] bool


def prefill(
    model: Decoder,
    tokens: jax.Array,  # [b, t]
    positions: jax.Array,  # [b, t]
    valid: jax.Array,  # [b, t] bool
    cache: KVCache,
    memory: MemoryState | None,
    control: WriteControl | None = None,
    key: jax.Array | None = None,
    *,
    segment: int = PREFILL_SEGMENT,
    progress: Callable[[int, int], None] | None = None,
) -> DecodeState:
    """Runs the prompt through the model (KV cache filled, memory written) once.

    Prompts longer than `segment` go in segments against the cache; token writes then
    equal one unsegmented write (the recurrence is sequential). Message writes (SSW)
    need the whole message in one call, so they are not segmented. `progress(done,
    total)` is called once each segment is computed.
    """
    t = tokens.shape[1]
    if cache.max_len - int(cache.end) < t:
        raise ValueError(
            f"prompt of {t} (padded) tokens does not fit: the cache has "
            f"{cache.max_len - int(cache.end)} of {cache.max_len} slots left"
        )
    control = control or WriteControl()
    step = t if control.mode == WriteMode.MESSAGES else segment
    for start in range(0, t, step):
        piece = slice(start, start + step)
        logits, cache, memory = forward(
            model, tokens[:, piece], positions[:, piece], valid[:, piece], cache, memory, control,
            attend_cache=int(cache.end) > 0, last_only=True,
        )  # fmt: skip
        if progress is not None:
            jax.block_until_ready((logits, cache, memory))  # the segment computed, not merely dispatched
            progress(min(start + step, t), t)
    # each row's next position follows its last real token (rows may be all padding)
    next_pos = jnp.max(jnp.where(valid, positions + 1, 0), axis=1).astype(jnp.int32)
    next_pos = jnp.where(jnp.any(valid, axis=1), next_pos, 0)
    return DecodeState(
        cache=cache,
        memory=memory,
        logits=logits[:, -1],
        positions=next_pos,
        key=jax.random.PRNGKey(0) if key is None else key,
        done=jnp.zeros(tokens.shape[0], bool),
    )


def scan_layers_default() -> bool:
    """Decode over stacked layers with a scan (GPU/TPU), or over per-layer buffers (CPU,
    where the scan copies every layer's weight slice each step: ../shared/notes/CPU_PERF.md
    measured ~10.6 GB/s stacked vs 26–30 GB/s separate on the Intel Xeons; compare with
    `scripts/bench_decode.py --layers scan|buffers`)."""
    return jax.default_backend() != "cpu"


_LAYER_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_buffers(model: Decoder) -> LayerBuffers:
    """`split_layers(model)`, cached per model until its parameters change (a new adapter)."""
    key = tuple(id(a) for a in jax.tree.leaves(nnx.state(model.layers)))
    hit = _LAYER_BUFFERS.get(model)
    if hit is None or hit[0] != key:
        hit = (key, split_layers(model))
        _LAYER_BUFFERS[model] = hit
    return hit[1]


def _decode_jitted():
    """`_decode` jitted for the default backend (`forward.jit_for_backend`)."""
    return jit_for_backend(
        _decode, static_argnames=("graphdef", "steps", "sampling", "write", "shardings"), donate_argnames=("state",)
    )


def _decode(graphdef, params, buffers, state: DecodeState, prefix, stop_ids, steps: int, sampling: Sampling, write: WriteMode, shardings):
    model = nnx.merge(graphdef, params)
    control = WriteControl(write)
    on_mesh = _on_mesh(shardings)

    def step(s: DecodeState, _):
        key, sub = jax.random.split(s.key)
        tok = sample(s.logits, sub, sampling)  # [b]
        live = ~s.done
        tok = jnp.where(live, tok, 0)
        logits, cache, memory = model(
            tok[:, None], s.positions[:, None], live[:, None], s.cache.replace(prefix=prefix), s.memory, control,
            last_only=True, layer_buffers=buffers,
        )
        cache = cache.replace(prefix=None)
        done = s.done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        new = DecodeState(cache, memory, logits[:, -1], s.positions + live, key, done)
        return (keep_shardings(new, shardings) if on_mesh else new), (tok, live)  # the carry stays where it was placed

    if state.cache.per_layer and prefix is not None:
        prefix = prefix.unstack()
    state, (tokens, live) = jax.lax.scan(step, state, None, length=steps)
    if on_mesh:  # the loop's result too: XLA may otherwise pick another layout for it
        state = keep_shardings(state, shardings)
    return state, tokens.T, live.T  # [b, steps]


def _on_mesh(shardings) -> bool:
    return any(s is not None for s in jax.tree.leaves(shardings, is_leaf=lambda x: x is None))


def decode(
    model: Decoder,
    state: DecodeState,
    steps: int,
    stop_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
    write: WriteMode = WriteMode.TOKENS,
    scan_layers: bool | None = None,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """`steps` tokens per row in one compiled scan. Returns (state, tokens, live) `[b, steps]`.

    `live` is False for steps after a row produced a stop token (those tokens are
    padding and were neither cached nor written). `state` is donated; on a mesh, every part
    of it keeps its sharding through the loop (`placed_shardings`). `scan_layers`
    (default `scan_layers_default()`): False runs the layers over per-layer copies of
    their weights (`layer_buffers`, kept per model: the weights' memory twice, a tied
    embedding's three times) and a per-layer cache (`KVCache.unstack`, made on the first
    call), which the returned state keeps, so the next call of a stream copies no cache;
    `forward` stacks it again.
    On a mesh the cache keeps its stacked, placed form.
    """
    if state.cache.max_len - int(state.cache.end) < steps:
        raise ValueError(f"{steps} decode steps do not fit: {state.cache.max_len - int(state.cache.end)} cache slots left")
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop ids, got {len(stop_ids)}")
    graphdef, params = nnx.split(model)
    # a fixed length, so the number of stop ids never changes the compiled shape
    stop = jnp.asarray(list(stop_ids) + [-1] * (MAX_STOP_IDS - len(stop_ids)), jnp.int32)
    scan = scan_layers_default() if scan_layers is None else scan_layers
    buffers = None if scan else layer_buffers(model)
    # a shared prefix goes in beside the donated state, so it outlives this call (other batches reuse it)
    prefix = state.cache.prefix
    cache = state.cache.replace(prefix=None)
    per_layer = buffers is not None and not _on_mesh(placed_shardings(cache))
    state = state.replace(cache=cache.unstack() if per_layer else cache.stack())
    state, tokens, live = _decode_jitted()(graphdef, params, buffers, state, prefix, stop, steps, sampling, write, placed_shardings(state))
    return state.replace(cache=state.cache.replace(prefix=prefix)), tokens, live


def stream(
    model: Decoder,
    state: DecodeState,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
    chunk: int = 16,
    write: WriteMode = WriteMode.TOKENS,
    on_state: Callable[[DecodeState], None] | None = None,
) -> Iterator[np.ndarray]:
    """Yields `[b, ≤chunk]` token arrays (−1 after a stop) as each chunk of steps finishes.

    Stops early once every row is done. `on_state` receives the final decode state.
    """
    left = max_new_tokens
    while left > 0:
        n = min(chunk, left)
        state, tokens, live = decode(model, state, n, stop_ids, sampling, write)
        left -= n
        live, tokens = gather((live, tokens))  # whole on every process, however it was sharded
        yield np.where(live, tokens, -1)
        if bool(jnp.all(state.done)):
            break
    if on_state is not None:
        on_state(state)


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    memory: MemoryState | None = None,
    stop_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
    seed: int = 0,
    chunk: int | None = None,
    segment: int = PREFILL_SEGMENT,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[list[int]], MemoryState | None]:
    """Generates for a batch of prompts (token ids). Returns replies (stop token included)
    and the memory after the prompts and replies were written.

    With δ-mem attached, `memory=None` starts from a zero memory and a `MemoryState`
    continues that one. A plain backbone (no δ-mem) has no memory and returns None.
    Raises `ContextWindowError` when the longest prompt + `max_new_tokens` does not fit
    the context window; `progress(done, total)` follows the prefill's segments.
    """
    from deltamem_jax.memory import DeltaMemAttention

    b = len(prompts)
    if not b or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_context(model.cfg, max(len(p) for p in prompts), max_new_tokens)
    length = prompt_length(max(len(p) for p in prompts), segment)
    tokens, positions, valid = left_pad(prompts, length)
    has_memory = isinstance(model.layers.attn, DeltaMemAttention)
    if has_memory and memory is None:
        memory = MemoryState.zeros(model.cfg.num_layers, b, model.layers.attn.memory.config)
    if not has_memory:
        memory = None
    cache = KVCache.create(model.cfg, b, length + bucket(max_new_tokens))
    state = prefill(
        model, tokens, positions, valid, cache, memory, WriteControl(), jax.random.PRNGKey(seed), segment=segment, progress=progress
    )
    final = []
    pieces = list(stream(model, state, max_new_tokens, stop_ids, sampling, chunk or max_new_tokens, on_state=final.append))
    out = np.concatenate(pieces, axis=1) if pieces else np.zeros((b, 0), np.int32)
    replies = [[int(t) for t in row if t >= 0] for row in out]
    return replies, final[0].memory
