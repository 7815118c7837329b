#!/usr/bin/env bash
# The multimodal commands end to end on the committed image slice and text: train a tiny MoE
# and its dense twin, eval on both splits, routes with its report, compare's refusal to
# overwrite, --resume, and the named refusals (a dense model's routes, a bad split). Prints
# PASS at the end.
#   bash tests/train/multimodal_cli_test.sh build/switchyard SOURCE_DIR
set -euo pipefail
sy=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for split in train t10k; do
  cp "$src/data/fashion-mnist-t10k-1000-images-idx3-ubyte.gz" "$work/$split-images-idx3-ubyte.gz"
  cp "$src/data/fashion-mnist-t10k-1000-labels-idx1-ubyte.gz" "$work/$split-labels-idx1-ubyte.gz"
done
config() {  # $1: the model's feed-forward part
  cat <<JSON
{"task": "multimodal",
 "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "patch": 7, "text_context": 32,
           "control_steps": 16 $1},
 "train": {"steps": 30, "lr": 0.003, "warmup": 5, "eval_interval": 15, "checkpoint_interval": 15},
 "data": {"image_dir": "$work", "val_images": 200, "text": "$src/data/austen.txt.gz",
          "train_episodes": 100, "val_episodes": 24, "images_per_step": 8, "text_per_step": 4,
          "control_per_step": 4, "eval_batches": 6}}
JSON
}
config ', "moe_every": 0, "d_ff": 48' >"$work/dense.json"
config ', "moe_every": 1, "moe": {"n_experts": 4, "top_k": 2, "d_ff": 24}' >"$work/moe.json"
fail() { echo "FAIL: $*"; exit 1; }

"$sy" train --config "$work/dense.json" --out "$work/dense" --threads 2 >"$work/out" 2>&1 || fail "train dense: $(cat "$work/out")"
grep -q "test: *image accuracy" "$work/out" || fail "train printed no test figures: $(cat "$work/out")"
"$sy" train --config "$work/moe.json" --out "$work/moe" --threads 2 >"$work/out" 2>&1 || fail "train moe: $(cat "$work/out")"
grep -q "NMI(modality; expert)" "$work/out" || fail "training printed no NMI: $(cat "$work/out")"
python3 -c "import json; h=json.load(open('$work/moe/history.json')); assert len(h['steps'])==30 and h['evals'][-1]['step']==30, h['evals']" || fail "history.json"

"$sy" eval --checkpoint "$work/moe" >"$work/out" 2>&1 || fail "eval: $(cat "$work/out")"
grep -q "test split: 48 images" "$work/out" || fail "eval: $(cat "$work/out")"
grep -q "MoE layer 1: NMI(modality; expert)" "$work/out" || fail "eval printed no NMI: $(cat "$work/out")"
"$sy" eval --checkpoint "$work/moe" --split val --set model.moe.capacity_factor_eval=0.5 >"$work/out" 2>&1 || fail "eval --split val: $(cat "$work/out")"
grep -q "val split" "$work/out" || fail "eval --split val: $(cat "$work/out")"
if "$sy" eval --checkpoint "$work/moe" --split train >"$work/out" 2>&1; then fail "eval took --split train"; fi
grep -q "expected test or val" "$work/out" || fail "bad split not named: $(cat "$work/out")"
if "$sy" eval --checkpoint "$work/moe" --set model.d_model=16 >"$work/out" 2>&1; then fail "eval took a changed shape"; fi

"$sy" routes --checkpoint "$work/moe" >"$work/out" 2>&1 || fail "routes: $(cat "$work/out")"
grep -q "NMI(modality; first-choice expert)" "$work/out" || fail "routes: $(cat "$work/out")"
grep -q "control" "$work/out" || fail "routes shows no control rows"
grep -q "<table>" "$work/moe/routes.html" || fail "routes.html has no table"
if "$sy" routes --checkpoint "$work/dense" >"$work/out" 2>&1; then fail "routes of a dense model"; fi
grep -q "no routes" "$work/out" || fail "dense routes not named: $(cat "$work/out")"

# A finished run resumes to itself; a resume needs a checkpoint of the same config.
"$sy" train --config "$work/dense.json" --out "$work/dense" --resume >"$work/out" 2>&1 || fail "--resume of a finished run: $(cat "$work/out")"
if "$sy" train --config "$work/dense.json" --out "$work/none" --resume >"$work/out" 2>&1; then fail "--resume without a checkpoint"; fi
grep -q "does not exist" "$work/out" || fail "--resume without a checkpoint not named: $(cat "$work/out")"
if "$sy" train --config "$work/moe.json" --out "$work/dense" --resume >"$work/out" 2>&1; then fail "--resume of another config"; fi
grep -q "another config" "$work/out" || fail "--resume of another config not named: $(cat "$work/out")"
if "$sy" compare --dense "$work/dense.json" --moe "$work/moe.json" --out "$work" >"$work/out" 2>&1; then fail "compare overwrote"; fi
grep -q "nothing was overwritten" "$work/out" || fail "compare: $(cat "$work/out")"
echo PASS
