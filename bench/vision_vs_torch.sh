#!/usr/bin/env bash
# Vision training speed against PyTorch in the same run: fashion-vit and fashion-vmoe trained
# for a few hundred steps by switchyard (its own reported training images/s, which includes
# loading and augmenting the batches) and the same models written plainly in PyTorch
# (bench/torch_vit.py, random inputs, bf16 autocast where switchyard's kernels run bf16), on the
# same threads. Prints one line per model with the ratio. Needs a build (build/switchyard), the
# installed data set (scripts/setup.sh) and torch (scripts/bench_env.sh).
#   bash bench/vision_vs_torch.sh [threads] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
steps=${2:-300}
py=$(bash scripts/bench_env.sh)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for model in fashion-vit fashion-vmoe; do
  build/switchyard train --config "$model" --steps "$steps" --threads "$threads" \
    --out "$out/$model" --set train.eval_interval=1000000 --set train.warmup=10 >"$out/log" 2>&1
  ours=$(sed -n 's/.* (\([0-9.]*\) training images\/s).*/\1/p' "$out/log")
  # The kernels line names the GEMM precision the config resolved to (auto: the faster one).
  tp=f32
  if head -1 "$out/log" | grep -q -- '-bf16 '; then tp=bf16; fi
  flag=""
  if [[ $model == fashion-vmoe ]]; then flag=--moe; fi
  torch=$("$py" bench/torch_vit.py --threads "$threads" --steps 20 $flag --precision "$tp" |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["images_per_s"])')
  python3 -c "print(f'$model: switchyard {$ours:.0f} images/s, torch ($tp) {$torch:.0f} images/s, ratio {$ours / $torch:.2f}x ($threads threads)')"
done
head -1 "$out/log"
