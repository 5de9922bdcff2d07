#!/usr/bin/env bash
# Training quality at equal tokens: LLaMA-20M on the default corpus (sotu,
# mistral tokenizer), 1000 steps of 64x256 tokens, rank d/4 = 64, two peak
# learning rates per method. Writes OUT/quality.tar.gz (each run's config,
# metrics.jsonl and summary), OUT/table.md and OUT/loss.png.
#   bash benchmarks/llama_quality.sh OUT [DATA_DIR]
# SPECS="grass 1e-2,grass 2e-2" runs only those (method lr) pairs.
set -euo pipefail
out=$1
data=${2:-}
mkdir -p "$out/runs"
common=(--model-size "${SIZE:-20m}" --batch-size 64 --steps "${STEPS:-1000}" --eval-every 100
        --eval-windows 512 --checkpoint-every 0 --log-every 50)
[ -n "$data" ] && common+=(--data-dir "$data")
specs=${SPECS:-"adamw 1e-3,adamw 3e-3,galore 1e-2,galore 2e-2,osd 1e-2,osd 2e-2,optax_galore 1e-2,optax_galore 2e-2"}
IFS=, read -ra spec_list <<< "$specs"
for spec in "${spec_list[@]}"; do
  set -- $spec
  python -m examples.llama train "${common[@]}" --optimizer "$1" --lr "$2" \
      --run-dir "$out/runs/20m-$1-lr$2" 2>&1 | grep -v "^\s*$" | tail -3
  # After every run, so that a run cut short still leaves the finished ones.
  tar czf "$out/quality.tar.gz" -C "$out/runs" \
      $(cd "$out/runs" && ls -d */config.json */metrics.jsonl */summary.json 2>/dev/null)
done
python -m examples.llama compare "$out"/runs/* --out "$out/loss.png" | tee "$out/table.md"
rm -rf "$out/runs"
