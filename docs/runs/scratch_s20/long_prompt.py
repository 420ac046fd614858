"""Prints a prompt of at least N tokens (SmolLM2's tokenizer, no chat template) for the
context-window check of issue 7:

    deltamem-jax generate --max-new-tokens 32 "$(python docs/runs/scratch_s20/long_prompt.py 9000)"  # fails at once
    deltamem-jax generate --max-new-tokens 32 "$(python docs/runs/scratch_s20/long_prompt.py 6000)"  # progress, a reply
(scratch, not maintained)
"""
import random
import sys

from models.gguf import read_gguf

n = int(sys.argv[1])
tok = read_gguf(load_tensors=False).tokenizer
words = "the river carried old boats past quiet houses while children counted stones and birds".split()
rng = random.Random(0)
out = []
while len(tok.encode(" ".join(out)).ids) < n:
    out.extend(rng.choice(words) for _ in range(100))
print(" ".join(out) + " Summarize in one sentence.")
