#!/usr/bin/env bash
# A small CPU demonstration of the length-generalization tasks (issue 18), not the study:
# copy and passkey, three schemes (alibi, rope, none), seed 0 only, a 2-layer 64-wide
# model. Run from anywhere; writes runs/ (ignored by git), figures/ and results/.
#   experiments/length_tasks/run_demo.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/length_tasks
COMMON=(model.d_model=64 model.num_layers=2 model.num_heads=4 train.batch_size=32
        train.log_every=100 train.progress=false optim.warmup_steps=50 eval.progress=false)
# copy: trained on strings of 1..15 symbols (length 32), tested at 32..512 (15..255 symbols)
relpos-train -m task=copy bias=alibi,rope,none train.length=32 train.steps=1200 \
    train.checkpoint_every=1200 "${COMMON[@]}" hydra.sweep.dir=$HERE/runs/copy
# passkey: trained at length <= 128 on stdlib filler, tested at 128..2048
relpos-train -m task=passkey bias=alibi,rope,none train.length=128 train.steps=1000 \
    train.checkpoint_every=1000 "${COMMON[@]}" hydra.sweep.dir=$HERE/runs/passkey
relpos-plot "inputs=[$HERE/runs]" out_dir=$HERE/figures merge_to=$HERE/results/demo.json \
    "title=Length-generalization tasks, CPU demonstration (1 seed)"
