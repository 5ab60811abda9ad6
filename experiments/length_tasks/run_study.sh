#!/usr/bin/env bash
# The task study (README.md says what was run and what it showed): every base scheme x
# 3 seeds on copy and assoc_recall (L = 32) and passkey (L = 128); the offset table's
# trained weights with the mask policy; LM passkey retrieval (quick LM preset, 4
# schemes, seed 0); Ruoss et al. (2023)'s reverse string as an anchor (not yet run).
#   experiments/length_tasks/run_study.sh [tasks|policies|lm_passkey|anchor|plot|all]
# Runs go to $HERE/runs/ (ignored by git); figures/ and results/ are committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/length_tasks
SCHEMES=none,sinusoidal,learned_abs,rope,xpos,offset,t5,alibi,kerple_power,kerple_log,sandwich,fire
COMMON=(model.d_model=64 model.num_layers=2 model.num_heads=4 train.batch_size=32
        train.log_every=100 train.progress=false optim.warmup_steps=50 eval.progress=false
        seed=0,1,2)
tasks() {
  for task in copy assoc_recall; do
    relpos-train -m task=$task bias=$SCHEMES train.length=32 train.steps=1200 \
      train.checkpoint_every=1200 "${COMMON[@]}" hydra.sweep.dir=$HERE/runs/$task
  done
  relpos-train -m task=passkey bias=$SCHEMES train.length=128 train.steps=1000 \
    train.checkpoint_every=1000 "${COMMON[@]}" hydra.sweep.dir=$HERE/runs/passkey
}
policies() {  # the offset table's trained weights with no attention beyond L (mask)
  local d
  for d in $HERE/runs/{copy,assoc_recall,passkey}/bias=offset,*; do
    relpos-eval "run_dir=$d" "+bias_overrides.policy=mask" "label=offset (mask beyond L)" \
      output=eval_mask.json eval.progress=false </dev/null
  done
}
lm_passkey() {  # retrieval without task training: the quick LM preset (L = 64) with
  # eval.passkey=true, for 4 schemes x seed 0 (what was run; add schemes with bias=...)
  relpos-train -m +experiment=extrapolation_quick bias=alibi,offset,rope,none seed=0 \
    "eval.modes=[nonoverlap]" eval.passkey=true hydra.sweep.dir=$HERE/runs/lm
  local d
  for d in $HERE/runs/lm/bias=offset,*; do  # the same tables with no attention beyond L
    relpos-eval "run_dir=$d" "+bias_overrides.policy=mask" "label=offset (mask beyond L)" \
      output=eval_mask.json eval.progress=false </dev/null
  done
}
anchor() {  # Ruoss et al. 2023: reverse string, binary, train sizes U{1..40}, test to 500
  # (2n + 2 tokens: train.length 82 holds n <= 40; 12x holds n <= 491). Decoder-only
  # next-token prediction after a separator, not their encoder-only setting.
  relpos-train -m task=reverse task.symbols=2 bias=none,sinusoidal,rope,alibi,learned_abs \
    train.length=82 train.steps=3000 train.checkpoint_every=3000 \
    "eval.task_multiples=[1,2,4,8,12]" "${COMMON[@]}" hydra.sweep.dir=$HERE/runs/anchor_reverse
}
plot() {  # tasks and LMs apart: each figure's panels share one training length
  relpos-plot "inputs=[$HERE/runs/copy,$HERE/runs/assoc_recall,$HERE/runs/passkey]" \
    out_dir=$HERE/figures/study merge_to=$HERE/results/study.json \
    "title=Length-generalization tasks: 12 schemes x 3 seeds"
  relpos-plot "inputs=[$HERE/runs/lm]" out_dir=$HERE/figures/lm_passkey \
    merge_to=$HERE/results/lm_passkey.json "title=Passkey retrieval by LMs trained at 64"
}
case "${1:-all}" in
  tasks|policies|lm_passkey|anchor|plot) "$1" ;;
  all) tasks; policies; lm_passkey; anchor; plot ;;
  *) echo "usage: $0 [tasks|policies|lm_passkey|anchor|plot|all]" >&2; exit 2 ;;
esac
