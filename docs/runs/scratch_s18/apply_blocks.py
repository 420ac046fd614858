p = "models/decoder.py"
s = open(p).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, old[:80]
    s = s.replace(old, new)
rep('''class LayerFlag(nnx.Variable):''', '''def decode_matmul_parts() -> int:
    """How many column blocks `split_layers` cuts each decode weight into: the cores XLA
    CPU may use here (at most 8). XLA CPU runs a layer's small matvec on one core, but
    independent matmuls on different cores at once, so a weight kept as one block per core
    streams from all of them (`scripts/ab_matmul_parts.py`)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def column_blocks(w: Array, parts: int) -> nnx.List:
    """w [m, n] as `parts` separate, contiguous column blocks (Params) for `matmul`."""
    return nnx.List([nnx.Param(jnp.asarray(b)) for b in jnp.array_split(w, parts, axis=1)])


def matmul(x: Array, w, precision=None) -> Array:
    """x [..., m] @ w [m, n], where w is an array, a Param, or column blocks
    (`column_blocks`: one matmul per block, concatenated)."""
    if isinstance(w, nnx.List):
        return jnp.concatenate([matmul(x, b, precision) for b in w], axis=-1)
    return jnp.einsum("...m,mn->...n", x, w[...] if isinstance(w, nnx.Variable) else w, precision=precision)


class LayerFlag(nnx.Variable):''')
old_fuse = s[s.index("    def fuse_for_decode(self, side_in"):s.index("    def project(self, x: Array)")]
rep(old_fuse, '''    def fuse_for_decode(self, side_in: Array | None = None, side_out: Array | None = None, parts: int = 1) -> None:
        """For decode's per-layer buffers (`split_layers`), on one layer's slice: the q/k/v
        weights become one `qkv_proj [d, (n+2k)·h + p]`, one matmul instead of three, and
        `o_proj` one `[n·h + p', d]` matrix, each kept as `parts` column blocks
        (`column_blocks`, one per core).

        A wrapper may append its own small projections of the same input (`side_in [d, p]`,
        returned by `project` as `side`) and of extra output inputs (`side_out [p', d]`,
        rows under `o_proj`, fed by `output(a, side)`): each then costs no matmul of its own.
        """
        d = self.q_proj.shape[0]  # one layer's slice: [d, n, h]
        cols = [self.q_proj[...].reshape(d, -1), self.k_proj[...].reshape(d, -1), self.v_proj[...].reshape(d, -1)]
        self.qkv_proj = column_blocks(jnp.concatenate(cols + ([] if side_in is None else [side_in.astype(cols[0].dtype)]), axis=1), parts)
        del self.q_proj, self.k_proj, self.v_proj
        w = self.o_proj[...]
        w = w.reshape(-1, w.shape[-1])  # [n·h, d]
        if side_out is not None:
            w = jnp.concatenate([w, side_out.astype(w.dtype)], axis=0)
        self.o_proj = column_blocks(w, parts)

''')
rep('''        if self.qkv_proj is not None:
            w = self.qkv_proj[...]
            side_cols = w.shape[1] > (n + 2 * kv) * h  # δ-mem's float32 projections: full precision
            z = jnp.einsum("btd,dp->btp", x, w, precision=jax.lax.Precision.HIGHEST if side_cols else None)
            b, t, _ = z.shape''', '''        if self.qkv_proj is not None:
            side_cols = sum(w.shape[1] for w in self.qkv_proj) > (n + 2 * kv) * h  # δ-mem's float32 projections: full precision
            z = matmul(x, self.qkv_proj, precision=jax.lax.Precision.HIGHEST if side_cols else None)
            b, t, _ = z.shape''')
old_out = s[s.index("    def output(self, a: Array, side"):s.index("    def __call__(self, x, positions, valid, cache, memory, control, use_rope):")]
rep(old_out, '''    def output(self, a: Array, side: Array | None = None) -> Array:
        """The output projection of a [b,t,n,h]; with `side` [b,t,p'] (decode buffers, see
        `fuse_for_decode`) also the rows appended under `o_proj`, in the same matmul."""
        b, t, n, h = a.shape
        a = a.reshape(b, t, n * h)
        if isinstance(self.o_proj, nnx.List):  # decode buffers: [n·h + p', d] in column blocks
            w, rows = self.o_proj, self.o_proj[0].shape[0]
        else:  # as one [n·h, d] matrix (a free reshape): with separate n, h axes XLA CPU
            w = self.o_proj[...]  # transposed the weight inside the decode loop, a copy every step
            w = w.reshape(-1, w.shape[-1])
            rows = w.shape[0]
        if side is not None:
            a = jnp.concatenate([a, side.astype(a.dtype)], axis=-1)
        if a.shape[-1] != rows:
            raise ValueError(f"o_proj has {rows} input rows, the attention output (and side) {a.shape[-1]}")
        y = matmul(a, w, precision=jax.lax.Precision.HIGHEST if side is not None else None)
        return y + self.o_bias[...] if self.cfg.o_bias else y

''')
rep('''    def __call__(self, x: Array) -> Array:
        g = jnp.einsum("btd,df->btf", x, self.gate_proj[...])
        u = jnp.einsum("btd,df->btf", x, self.up_proj[...])
        if self.bias:
            g, u = g + self.gate_bias[...], u + self.up_bias[...]
        y = jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, self.down_proj[...])
        return y + self.down_bias[...] if self.bias else y''', '''    def fuse_for_decode(self, parts: int = 1) -> None:
        """For decode's per-layer buffers, on one layer's slice: gate and up as one
        `gate_up_proj [d, 2f]`, one matmul instead of two, the weights in `parts` column
        blocks (`column_blocks`)."""
        self.gate_up_proj = column_blocks(jnp.concatenate([self.gate_proj[...], self.up_proj[...]], axis=1), parts)
        self.down_proj = column_blocks(self.down_proj[...], parts)
        del self.gate_proj, self.up_proj

    def __call__(self, x: Array) -> Array:
        if hasattr(self, "gate_up_proj"):
            g, u = jnp.split(matmul(x, self.gate_up_proj), 2, axis=-1)
        else:
            g, u = matmul(x, self.gate_proj), matmul(x, self.up_proj)
        if self.bias:
            g, u = g + self.gate_bias[...], u + self.up_bias[...]
        y = matmul(jax.nn.silu(g) * u, self.down_proj)
        return y + self.down_bias[...] if self.bias else y''')
rep('''def split_layers(model: Decoder) -> LayerBuffers:
    """A copy of every layer's parameters as separate arrays, its attention's projections
    fused for decode (`fuse_for_decode`: q/k/v as one matmul, and δ-mem's own small
    projections folded into those of the attention when attached)."""
    graphdef, state = nnx.split(model.layers)
    layer_graph, states = None, []
    for i in range(model.cfg.num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))  # noqa: B023
        layer.attn.fuse_for_decode()''', '''def split_layers(model: Decoder, parts: int | None = None) -> LayerBuffers:
    """A copy of every layer's parameters as separate arrays, its attention's projections
    fused for decode (`fuse_for_decode`: q/k/v as one matmul, and δ-mem's own small
    projections folded into those of the attention when attached), and every matmul
    weight cut into `parts` column blocks (default `decode_matmul_parts()`)."""
    parts = decode_matmul_parts() if parts is None else parts
    graphdef, state = nnx.split(model.layers)
    layer_graph, states = None, []
    for i in range(model.cfg.num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))  # noqa: B023
        layer.attn.fuse_for_decode(parts=parts)
        layer.mlp.fuse_for_decode(parts)''')
open(p, "w").write(s)
p = "deltamem_jax/memory.py"
s = open(p).read()
rep('''    def fuse_for_decode(self) -> None:''', '''    def fuse_for_decode(self, parts: int = 1) -> None:''')
rep('''            return self.base.fuse_for_decode()''', '''            return self.base.fuse_for_decode(parts=parts)''')
rep('''        self.base.fuse_for_decode(side_in=self.memory.in_proj[...], side_out=side_out)''', '''        self.base.fuse_for_decode(side_in=self.memory.in_proj[...], side_out=side_out, parts=parts)''')
open(p, "w").write(s)
