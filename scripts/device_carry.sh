#!/usr/bin/env bash
# Readies this checkout for training on a lent accelerator through the device tool, whose calls
# carry at most 64 MiB: the embedded GGUF (98 MB) goes over in two halves, one per call, and
# docs/ (39 MB of result files the device does not need) stays behind while the calls are made.
#   bash scripts/device_carry.sh prepare   # halves in .aside/, docs/ moved to .aside/docs, part 00 in .stash/
#   bash scripts/device_carry.sh part 01   # .stash/ holds only part 01 (for the second call)
#   bash scripts/device_carry.sh restore   # docs/ back, index restored; run it before any commit
# The calls: the first carries [".stash", ".whl"] and copies .stash/gguf.part00 to /root/stash; the
# second, made while the machine is still warm (30 s), carries part 01 and joins the two there
# (`cat /root/stash/gguf.part00 .stash/gguf.part01 > /root/stash/smollm2.gguf`, then `sha256sum -c`
# against .stash/sha256). .whl holds the gguf wheel only; the device's own jax and flax are used.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=.git/info/exclude
for d in /.stash/ /.aside/ /.whl/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
case "${1:-}" in
  prepare)
    [ -e .aside/docs ] && { echo "already prepared (.aside/docs exists); restore first" >&2; exit 1; }
    gguf=$(.venv/bin/python -c "from models.gguf import default_gguf_path as p; print(p())")
    mkdir -p .aside .stash .whl
    split -n 2 -d "$gguf" .aside/gguf.part
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1"  /root/stash/smollm2.gguf"}' > .stash/sha256
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "gguf==$(.venv/bin/python -c 'import gguf, importlib.metadata as m; print(m.version("gguf"))')"
    git rm -r -q --cached docs && mv docs .aside/docs
    "$0" part 00 ;;
  part)
    mv .stash/gguf.part* .aside/ 2>/dev/null || true
    mv ".aside/gguf.part$2" .stash/ && ls -l .stash ;;
  restore)
    [ -e .aside/docs ] && mv .aside/docs docs
    git reset -q -- docs
    git status --short | head ;;
  *) echo "usage: $0 prepare | part NN | restore" >&2; exit 2 ;;
esac
