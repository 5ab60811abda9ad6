#!/usr/bin/env bash
# The task study of issue 18 (not yet run in full; see README.md "Still to run"): every
# base scheme x 3 seeds on copy and assoc_recall (L = 32) and passkey (L = 128), the
# offset table's policies on the same weights, LM passkey retrieval by the extrapolation
# study's quick runs, and Ruoss et al. (2023)'s reverse string as an anchor.
#   experiments/length_tasks/run_study.sh [tasks|policies|lm_passkey|anchor|plot|all]
# Runs go to $HERE/runs/ (ignored by git); figures/ and results/ are committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/length_tasks
QUICK="${QUICK_RUNS:-experiments/extrapolation/runs/quick}"  # the LM runs (task=lm)
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
policies() {  # the offset table's trained weights with mask / zero beyond L
  local d pol
  for d in $HERE/runs/*/bias=offset,*; do
    for pol in mask zero; do
      relpos-eval "run_dir=$d" "+bias_overrides.policy=$pol" "label=offset ($pol beyond L)" \
        output=eval_$pol.json eval.progress=false </dev/null
    done
  done
}
lm_passkey() {  # retrieval without task training, at 1..32x L, seeds 0-2 of every scheme
  local d
  for d in "$QUICK"/bias=*seed=[012]; do
    relpos-eval "run_dir=$d" eval.passkey=true "eval.modes=[]" eval.attention_windows=0 \
      output=eval_passkey.json eval.progress=false </dev/null
  done
}
anchor() {  # Ruoss et al. 2023: reverse string, binary, train sizes U{1..40}, test to 500
  # (2n + 2 tokens: train.length 82 holds n <= 40; 12x holds n <= 491). Decoder-only
  # next-token prediction after a separator, not their encoder-only setting.
  relpos-train -m task=reverse task.symbols=2 bias=none,sinusoidal,rope,alibi,learned_abs \
    train.length=82 train.steps=3000 train.checkpoint_every=3000 \
    "eval.task_multiples=[1,2,4,8,12]" "${COMMON[@]}" hydra.sweep.dir=$HERE/runs/anchor_reverse
}
plot() {
  relpos-plot "inputs=[$HERE/runs]" out_dir=$HERE/figures/study merge_to=$HERE/results/study.json \
    "title=Length-generalization tasks: every scheme, 3 seeds"
}
case "${1:-all}" in
  tasks|policies|lm_passkey|anchor|plot) "$1" ;;
  all) tasks; policies; lm_passkey; anchor; plot ;;
  *) echo "usage: $0 [tasks|policies|lm_passkey|anchor|plot|all]" >&2; exit 2 ;;
esac
