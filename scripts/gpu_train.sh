#!/usr/bin/env bash
# The GPU-session training run (device tool, one H100): TSW and MSW trained side by side,
# each ending itself after $TL seconds with a checkpoint, then both adapters evaluated.
# Expects the GGUF at $GGUF and the wheels it needs on PYTHONPATH. Results under $OUT.
set -u
STEPS=${STEPS:-800} TL=${TL:-400} BATCH=${BATCH:-32} LIMIT=${LIMIT:-200} GGUF=${GGUF:?path of the SmolLM2 GGUF}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
common=(--model "$GGUF" --steps "$STEPS" --batch-size "$BATCH" --lr 3e-3 --time-limit "$TL"
        --eval-every 100 --eval-episodes 64 --checkpoint-every 100 --keep 1)
python3 scripts/train.py --out runs/tsw "${common[@]}" > "$OUT/train_tsw.log" 2>&1 &
python3 scripts/train.py --out runs/msw --sub-states 4 "${common[@]}" > "$OUT/train_msw.log" 2>&1 &
wait
tar czf "$OUT/runs.tgz" runs/*/adapter runs/*/metrics.jsonl runs/*/training_curves.png
tar czf "$OUT/ckpt_tsw.tgz" runs/tsw/checkpoints
for v in tsw msw; do
  python3 scripts/eval_recall.py --model "$GGUF" --adapter runs/$v/adapter --json "$OUT/eval_$v.json" \
    --records "$OUT/eval_$v.jsonl" --limit "$LIMIT" --ppl-text .gpu_b/locomo10.json > "$OUT/eval_$v.log" 2>&1 &
done
wait
tail -n 30 "$OUT"/train_*.log | tr '\r' '\n' | grep -v "^train: .*it/s\]$" | tail -n 40
cat "$OUT"/eval_*.log | grep -v "^\[" | head -n 80
