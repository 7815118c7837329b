#!/usr/bin/env bash
# The vision commands end to end on the committed 1000-image slice: train a tiny dense ViT and a
# tiny per-patch MoE, eval (and eval under another capacity factor), routes with its report,
# superclasses, compare's refusal to overwrite, --resume, and the named refusals (a changed
# shape, a bad split). Prints PASS at the end.
#   bash tests/train/vision_cli_test.sh build/switchyard SOURCE_DIR
set -euo pipefail
sy=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for split in train t10k; do
  cp "$src/data/fashion-mnist-t10k-1000-images-idx3-ubyte.gz" "$work/$split-images-idx3-ubyte.gz"
  cp "$src/data/fashion-mnist-t10k-1000-labels-idx1-ubyte.gz" "$work/$split-labels-idx1-ubyte.gz"
done
config() {  # $1: the model's MoE part
  cat <<JSON
{"task": "vision",
 "model": {"patch": 7, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 48 $1},
 "train": {"steps": 40, "batch": 32, "lr": 0.003, "warmup": 5, "eval_interval": 20,
           "checkpoint_interval": 20},
 "data": {"dir": "$work", "val_images": 200}}
JSON
}
config "" >"$work/dense.json"
config ', "moe_last": 1, "moe": {"n_experts": 4, "top_k": 2, "d_ff": 24, "batch_prioritized": true}' >"$work/moe.json"
fail() { echo "FAIL: $*"; exit 1; }

"$sy" train --config "$work/dense.json" --out "$work/dense" --threads 2 >"$work/out" 2>&1 || fail "train dense: $(cat "$work/out")"
grep -q "test accuracy" "$work/out" || fail "train printed no test accuracy"
"$sy" train --config "$work/moe.json" --out "$work/moe" --threads 2 >"$work/out" 2>&1 || fail "train moe: $(cat "$work/out")"

"$sy" eval --checkpoint "$work/moe" >"$work/out" 2>&1 || fail "eval: $(cat "$work/out")"
grep -q "test split: 1000 images, accuracy" "$work/out" || fail "eval: $(cat "$work/out")"
grep -q "confusion matrix" "$work/out" || fail "eval printed no confusion matrix"
grep -q "MoE layer 0: first-choice patches per expert" "$work/out" || fail "eval printed no expert mix"
"$sy" eval --checkpoint "$work/moe" --split val --set model.moe.capacity_factor_eval=0.25 \
  --set model.moe.batch_prioritized=false >"$work/out" 2>&1 || fail "eval --set: $(cat "$work/out")"
grep -q "val split: 200 images" "$work/out" || fail "eval --split val: $(cat "$work/out")"

if "$sy" eval --checkpoint "$work/moe" --set model.d_model=16 >"$work/out" 2>&1; then fail "eval took a changed shape"; fi
grep -q "expected" "$work/out" || fail "changed shape not named: $(cat "$work/out")"
if "$sy" eval --checkpoint "$work/moe" --split train >"$work/out" 2>&1; then fail "eval took --split train"; fi
grep -q "expected test or val" "$work/out" || fail "bad split not named: $(cat "$work/out")"

"$sy" routes --checkpoint "$work/moe" >"$work/out" 2>&1 || fail "routes: $(cat "$work/out")"
grep -q "NMI(class; expert)" "$work/out" || fail "routes: $(cat "$work/out")"
grep -q "data:image/png;base64" "$work/moe/routes.html" || fail "routes.html has no images"
if "$sy" routes --checkpoint "$work/dense" >"$work/out" 2>&1; then fail "routes of a dense model"; fi

"$sy" superclasses --checkpoint "$work/dense" --experts 2 --out "$work/sc.json" >"$work/out" 2>&1 || fail "superclasses: $(cat "$work/out")"
python3 -c "import json,sys; s=json.load(open('$work/sc.json'))['superclass']; assert len(s)==10 and sorted(set(s))==[0,1] and s.count(0)==5, s" || fail "superclasses JSON"
grep -q "<svg" "$work/sc.svg" || fail "no superclasses picture"

# A finished run resumes to itself; a resume needs a checkpoint of the same config.
"$sy" train --config "$work/dense.json" --out "$work/dense" --resume >"$work/out" 2>&1 || fail "--resume of a finished run: $(cat "$work/out")"
if "$sy" train --config "$work/dense.json" --out "$work/none" --resume >"$work/out" 2>&1; then fail "--resume without a checkpoint"; fi
grep -q "does not exist" "$work/out" || fail "--resume without a checkpoint not named: $(cat "$work/out")"
if "$sy" train --config "$work/moe.json" --out "$work/dense" --resume >"$work/out" 2>&1; then fail "--resume of another config"; fi
grep -q "another config" "$work/out" || fail "--resume of another config not named: $(cat "$work/out")"
if "$sy" compare --dense "$work/dense.json" --moe "$work/moe.json" --out "$work" >"$work/out" 2>&1; then fail "compare overwrote"; fi
grep -q "nothing was overwritten" "$work/out" || fail "compare: $(cat "$work/out")"
echo PASS
