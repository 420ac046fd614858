#!/usr/bin/env bash
# A training run on a lent accelerator (the device tool gives ~15 minutes): continues from an
# adapter with a large batch, ends itself after $TL seconds with a checkpoint and the exported
# adapter, then evaluates that adapter on held-out episodes. Extra arguments go to train.py,
# e.g. the curriculum flags of the CPU run it continues:
#   GGUF=... OUT=$OUT bash scripts/gpu_train.sh --rank 16 \
#     --relations door_code,locker,birthday,appointment --max-facts 4 --max-chitchat 0 --update-rate 0 \
#     --never-said-rate 0 --value-weight 5 --beta-weight 10 --plain-weight 1 --context-weight 1
# (the default INIT, the shipped adapter, is rank 16: the run's --rank must match its adapter's)
# Expects the GGUF at $GGUF and the wheels it needs on PYTHONPATH. Results under $OUT.
set -u
: "${GGUF:?path of the SmolLM2 GGUF}" "${OUT:?output folder}"
INIT=${INIT:-deltamem_jax/adapters/smollm2-135m-instruct-tsw} STEPS=${STEPS:-2000} TL=${TL:-420} BATCH=${BATCH:-64}
LIMIT=${LIMIT:-200} EVAL_ARGS=${EVAL_ARGS:-}
export PYTHONUNBUFFERED=1
python3 scripts/train.py --model "$GGUF" --out runs/gpu --init-adapter "$INIT" --steps "$STEPS" --batch-size "$BATCH" \
  --lr 3e-3 --time-limit "$TL" --eval-every 100 --eval-episodes 64 --checkpoint-every 100 --keep 1 "$@" > "$OUT/train.log" 2>&1
tar czf "$OUT/run.tgz" runs/gpu/adapter runs/gpu/metrics.jsonl runs/gpu/training_curves.png runs/gpu/checkpoints
# shellcheck disable=SC2086  # EVAL_ARGS is a list of flags, e.g. "--relations door_code,locker"
python3 scripts/eval_recall.py --model "$GGUF" --adapter runs/gpu/adapter --json "$OUT/eval.json" --records "$OUT/eval.jsonl" \
  --limit "$LIMIT" $EVAL_ARGS > "$OUT/eval.log" 2>&1
tr '\r' '\n' < "$OUT/train.log" | grep -v "^train: .*it/s" | tail -n 30
grep -v "^\[" "$OUT/eval.log" | head -n 60
