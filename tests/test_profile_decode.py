"""`scripts/profile_decode.py` names the ops of an optimized HLO program by what they do
(hand-made HLO in the text form XLA CPU dumps; no compilation)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from profile_decode import classify, hlo_ops  # noqa: E402

HLO = """HloModule jit__decode, is_scheduled=true

%fused_computation (param_0: f32[1,3,3,1,537], param_1: f32[]) -> f32[1,3,3,1] {
  %param_0 = f32[1,3,3,1,537]{4,3,2,1,0} parameter(0)
  %param_1 = f32[] parameter(1)
  ROOT %reduce_sum.1 = f32[1,3,3,1]{3,2,1,0} reduce(%param_0, %param_1), dimensions={4}, to_apply=%region_1
}

%fused_computation.3 (param_0.3: f32[3,536,64], param_1.3: f32[3,64,3]) -> f32[3,536,3] {
  %param_0.3 = f32[3,536,64]{2,1,0} parameter(0)
  %param_1.3 = f32[3,64,3]{2,1,0} parameter(1)
  ROOT %dot.9 = f32[3,536,3]{2,1,0} dot(%param_0.3, %param_1.3), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

%fused_add (p0: f32[1,576], p1: f32[1,576]) -> f32[1,576] {
  %p0 = f32[1,576]{1,0} parameter(0)
  %p1 = f32[1,576]{1,0} parameter(1)
  ROOT %add.1 = f32[1,576]{1,0} add(%p0, %p1)
}

ENTRY %main.1 (embed: f32[49152,576], w: f32[576,1536], x: f32[576,1], k: f32[3,536,64], q: f32[3,64,3], s: f32[1,3,3,1,537]) -> f32[1,49152] {
  %embed = f32[49152,576]{1,0} parameter(0)
  %w = f32[576,1536]{1,0} parameter(1)
  %x = f32[576,1]{1,0} parameter(2)
  %k = f32[3,536,64]{2,1,0} parameter(3)
  %q = f32[3,64,3]{2,1,0} parameter(4)
  %s = f32[1,3,3,1,537]{4,3,2,1,0} parameter(5)
  %dot.1 = f32[1,1536]{1,0} dot(%x, %w), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(_decode)/dot_general"}
  %ynn_fusion.3 = f32[3,536,3]{2,1,0} fusion(%k, %q), kind=kCustom, calls=%fused_computation.3
  %ynn_fusion = f32[1,3,3,1]{3,2,1,0} fusion(%s, %c), kind=kCustom, calls=%fused_computation
  %add_fusion = f32[1,576]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  ROOT %dot.2 = f32[1,49152]{1,0} dot(%x, %embed), lhs_contracting_dims={0}, rhs_contracting_dims={1}
}
"""


def test_ops_are_grouped_by_what_they_do():
    ops, computations = hlo_ops(HLO)
    assert computations["fused_computation.3"] == ["param_0.3", "param_1.3", "dot.9"]
    assert classify("dot.1", ops, computations, vocab=49152) == ("weights 576×1536", 4 * 576 * 1536)
    assert classify("dot.2", ops, computations, vocab=49152) == ("LM head", 4 * 49152 * 576)
    attention = "attention (batched dots, softmax)"
    assert classify("ynn_fusion.3", ops, computations, vocab=49152)[0] == attention
    assert classify("ynn_fusion", ops, computations, vocab=49152)[0] == attention
    assert classify("add_fusion", ops, computations, vocab=49152)[0].startswith("other")
