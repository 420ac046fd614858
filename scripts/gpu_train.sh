#!/usr/bin/env bash
# A training run on a lent accelerator (the device tool gives ~15 minutes): continues from an
# adapter with a large batch, ends itself after $TL seconds with a checkpoint and the exported
# adapter, then evaluates that adapter on held-out episodes. Extra arguments go to train.py,
# e.g. stage 12's (docs/RESULTS.md), which continued the stage-11 adapter:
#   GGUF=/root/stash/smollm2.gguf OUT=$OUT STEPS=300 TL=430 bash scripts/gpu_train.sh --rank 16 --seed 7 --lr 2e-3 \
#     --relations door_code,locker,birthday,appointment --min-facts 1 --max-facts 4 --max-chitchat 0 --update-rate 0.1 \
#     --never-said-rate 0 --value-weight 5 --beta-weight 10 --plain-weight 1 --plain-len 128 --context-weight 1 \
#     --context-len 176 --no-remat --checkpoint-every 50
# (the default INIT, the shipped adapter, is rank 16: the run's --rank must match its adapter's).
# Stage 14, the shipped adapter, continued stage 12 with STEPS=450 TL=400, --seed 8 --lr 1e-3 --min-facts 3 and the rest as above.
# Expects the GGUF at $GGUF, and the repository root and the wheels it needs on PYTHONPATH. The run folder is $RUN (a plain_corpus.json
# there is reused rather than generated again). Results under $OUT; the checkpoints come back as
# ckpt.tgz.NN pieces (`cat ckpt.tgz.* | tar xz` restores them, and a rerun with the same flags resumes).
#
# Getting there (what worked on the H200 on 2026-11-30; docs/RESULTS.md § Stage 12):
# - The GGUF (98 MB) and the repository (49 MB, 39 of them docs/) exceed the 64 MiB a call carries:
#   `bash scripts/device_carry.sh prepare` halves the GGUF and sets docs/ aside; the first call stashes
#   part 00 in /root/stash, the next (within the machine's 30 s warm window) carries part 01 and joins
#   them there; `bash scripts/device_carry.sh restore` after the calls. Its header has the commands.
# - Use the machine's own flax (0.12.10 there, with jax 0.11.2): this repository's pin, flax 0.12.8, fails to
#   import under jax 0.11.2 (jax.experimental.hijax has no HiPrimitive). Carry only the gguf wheel and
#   install it with `pip install --no-deps --target /tmp/site2 .whl/gguf*.whl` (the device reaches no package index).
# - With --update-rate > 0 an episode in context needs --context-len 176 (136 is too short).
# - eval_recall needs LoCoMo for its perplexity: carry a copy and pass EVAL_ARGS="--ppl-text PATH",
#   or evaluate the returned adapter on a CPU machine.
set -u
: "${GGUF:?path of the SmolLM2 GGUF}" "${OUT:?output folder}"
INIT=${INIT:-deltamem_jax/adapters/smollm2-135m-instruct-tsw} STEPS=${STEPS:-2000} TL=${TL:-420} BATCH=${BATCH:-64}
LIMIT=${LIMIT:-200} EVAL_ARGS=${EVAL_ARGS:-} RUN=${RUN:-runs/gpu}
export PYTHONUNBUFFERED=1
python3 scripts/train.py --model "$GGUF" --out "$RUN" --init-adapter "$INIT" --steps "$STEPS" --batch-size "$BATCH" \
  --lr 3e-3 --time-limit "$TL" --eval-every 100 --eval-episodes 64 --checkpoint-every 100 --keep 1 "$@" > "$OUT/train.log" 2>&1
# the device tool returns files of at most 16 MiB: the adapter apart, the checkpoints (with the optimizer) in pieces
tar czf "$OUT/run.tgz" "$RUN"/adapter "$RUN"/metrics.jsonl "$RUN"/training_curves.png
tar cz "$RUN"/checkpoints | split -b 15M -d - "$OUT/ckpt.tgz."
# shellcheck disable=SC2086  # EVAL_ARGS is a list of flags, e.g. "--relations door_code,locker"
python3 scripts/eval_recall.py --model "$GGUF" --adapter "$RUN"/adapter --json "$OUT/eval.json" --records "$OUT/eval.jsonl" \
  --limit "$LIMIT" $EVAL_ARGS > "$OUT/eval.log" 2>&1
tr '\r' '\n' < "$OUT/train.log" | grep -v "^train: .*it/s" | tail -n 30
grep -v "^\[" "$OUT/eval.log" | head -n 60
