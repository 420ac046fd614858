"""The benchmark's torch model (`bench_decode.torch_model_from_gguf`, read_gguf's weights in
LlamaForCausalLM) against transformers' own GGUF loader: weights and logits
(scratch, not maintained): python docs/runs/scratch_s20/torch_from_gguf_check.py"""
import sys
import time

import torch
import transformers

sys.path.insert(0, "scripts")
import bench_decode  # noqa: E402
from models.gguf import default_gguf_path  # noqa: E402

t0 = time.perf_counter()
ours = bench_decode.torch_model_from_gguf(torch, transformers)
t1 = time.perf_counter()
path = default_gguf_path()
ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
t2 = time.perf_counter()
ids = torch.tensor([[1, 2, 3, 400, 5000, 77, 8888, 12, 9]])
with torch.inference_mode():
    diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
a, b = ours.state_dict(), ref.state_dict()
print(f"built in {t1 - t0:.1f} s (from_pretrained(gguf_file=) {t2 - t1:.1f} s); same keys: {set(a) == set(b)}; "
      f"max weight difference {max((a[k] - b[k]).abs().max().item() for k in a)}; max logit difference {diff}")
