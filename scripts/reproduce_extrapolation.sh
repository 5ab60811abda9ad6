#!/usr/bin/env bash
# Reproduce the extrapolation study: train, evaluate far beyond the training length, draw
# the figures and tables. Each preset is one corpus (its fingerprint is in table.md).
#
#   scripts/reproduce_extrapolation.sh quick          # every scheme x 5 seeds, CPU (~1 h on 2 cores)
#   scripts/reproduce_extrapolation.sh ablation       # offset/T5 table ablation + policy and RoPE re-evaluations (needs quick)
#   scripts/reproduce_extrapolation.sh lengths        # the breakpoint at L = 32, 128 and 256 (L = 64: quick)
#   scripts/reproduce_extrapolation.sh alibi_lengths  # the ALiBi paper's Table 5 shape: ALiBi at 64/128/256, sinusoidal at 64, to 3072
#   scripts/reproduce_extrapolation.sh alibi_heads    # ALiBi with 8 heads, with and without its keys beyond L
#   scripts/reproduce_extrapolation.sh sensitivity    # FIRE threshold, xPos scale_base, Sandwich d'
#   scripts/reproduce_extrapolation.sh context        # the quick runs with keys beyond L masked (needs quick)
#   scripts/reproduce_extrapolation.sh content        # the content-reading schemes x 3 seeds in the quick preset
#   scripts/reproduce_extrapolation.sh all            # the presets above, in that order
#   scripts/reproduce_extrapolation.sh paper_reduced  # short GPU run
#   scripts/reproduce_extrapolation.sh paper          # the full GPU setting (needs network)
#   scripts/reproduce_extrapolation.sh quick hydra/launcher=joblib hydra.launcher.n_jobs=2
#
# Extra arguments are passed to every relpos-train call. Runs go to $STUDY/runs/<preset>/
# (not committed: they hold checkpoints); figures and table.md to $STUDY/figures/<preset>/,
# every run's results merged into $STUDY/results/<preset>.json. STUDY defaults to
# experiments/extrapolation (set RELPOS_STUDY_DIR to write elsewhere); SKIP_TRAIN=1 only
# re-evaluates and redraws from existing runs.
set -euo pipefail
preset="${1:-quick}"
shift || true
cd "$(dirname "$0")/.."
study="${RELPOS_STUDY_DIR:-experiments/extrapolation}"
R="$study/runs"
mkdir -p "$study/results"
start=$(date +%s)
# relpos-eval settings of the presets (relpos-eval does not read experiment presets)
QUICK_EVAL=("eval.multiples=[1,2,4,8,16,32]" "eval.modes=[nonoverlap,sliding]" eval.tokens=65536)
CONTEXT_EVAL=("eval.multiples=[1,4,32]" "eval.modes=[nonoverlap,sliding]" eval.tokens=65536)
LENGTHS_EVAL=("eval.lengths=[32,64,128,256,512,1024,2048]" "eval.modes=[nonoverlap]" eval.tokens=65536)

train() {  # train PRESET_DIR ARGS...: one sweep unless SKIP_TRAIN
  local dir="$1"; shift
  [ -n "${SKIP_TRAIN:-}" ] || relpos-train -m "hydra.sweep.dir=$dir" "$@" ${extra[@]+"${extra[@]}"}
}
plot() {  # plot NAME TITLE INPUTS...
  local name="$1" title="$2"; shift 2
  local inputs; inputs=$(printf "'%s'," "$@"); inputs="[${inputs%,}]"
  relpos-plot "inputs=$inputs" "out_dir=$study/figures/$name" \
    "merge_to=$study/results/$name.json" "title='$title'"
}
reeval() {  # reeval SWEEP PATH_PATTERN OUTPUT LABEL OVERRIDE EVAL_ARGS...: a relpos-eval
  # per finished run under SWEEP whose folder matches PATH_PATTERN (find -path)
  local sweep="$1" pattern="$2" output="$3" label="$4" override="$5"; shift 5
  [ -d "$sweep" ] || return 0
  find "$sweep" -name results.json -path "$pattern" -print0 | sort -z |
  while IFS= read -r -d '' f; do
    d=$(dirname "$f")
    relpos-eval "run_dir=$d" "$override" "label=$label" "output=$output" "$@" eval.progress=false </dev/null \
      ${eval_extra[@]+"${eval_extra[@]}"}
  done
}
extra=("$@")
bias_free=()  # sweeps that choose their own bias drop a bias=... argument
eval_extra=()  # eval.* arguments apply to the re-evaluations too
for a in "$@"; do
  [[ "$a" == bias=* ]] || bias_free+=("$a")
  [[ "$a" != eval.* ]] || eval_extra+=("$a")
done

quick() {
  train "$R/quick" +experiment=extrapolation_quick
  # results.json only: the re-evaluations (policies, RoPE PI/NTK) belong to the ablation
  plot quick "Quick preset: tiny LM trained at 64 tokens on the offline corpus" \
    "$R/quick/**/results.json"
}
ablation() {
  extra=(${bias_free[@]+"${bias_free[@]}"})
  train "$R/ablation" +experiment=extrapolation_ablation
  train "$R/ablation_t5" +experiment=extrapolation_ablation bias=t5 +variant=t5_md_full,t5_md_double
  for pol in mask zero; do  # out-of-range policies: the quick preset's trained tables
    reeval "$R/quick" "*/bias=offset,*" "eval_$pol.json" "offset ($pol beyond L)" \
      "+bias_overrides.policy=$pol" "${QUICK_EVAL[@]}"
  done
  for f in 4 32; do  # RoPE at evaluation time: position interpolation and NTK scaling
    reeval "$R/quick" "*/bias=rope,*seed=[012]*" "eval_pi$f.json" "rope (PI x$f)" \
      "+bias_overrides.interpolation=$f" "${QUICK_EVAL[@]}"
    reeval "$R/quick" "*/bias=rope,*seed=[012]*" "eval_ntk$f.json" "rope (NTK x$f)" \
      "+bias_overrides.ntk_factor=$f" "${QUICK_EVAL[@]}"
    reeval "$R/quick" "*/bias=rope,*seed=[012]*" "eval_yarn$f.json" "rope (YaRN x$f)" \
      "+bias_overrides.name=yarn" "+bias_overrides.factor=$f" \
      "+bias_overrides.original_length=64" "${QUICK_EVAL[@]}"  # 64: quick's train.length
  done
  plot ablation "The offset-specific limit: policy beyond L, untrained rows, randomized positions, T5 max_distance" \
    "$R/ablation" "$R/ablation_t5" "$R/quick/bias=offset,*" "$R/quick/bias=t5,*/**/results.json" \
    "$R/quick/bias=alibi,*/**/results.json" "$R/quick/bias=fire,*/**/results.json"
  if compgen -G "$R/quick/bias=rope,*" > /dev/null; then  # the sweep may have left rope out
    plot rope_eval "RoPE at evaluation time: interpolation, NTK, YaRN, and its keys beyond L masked" \
      "$R/quick/bias=rope,*seed=[012]*"
  fi
}
lengths() {
  extra=(${bias_free[@]+"${bias_free[@]}"})
  for L in 32 128 256; do
    train "$R/lengths_L$L" +experiment=extrapolation_lengths "train.length=$L" \
      "train.batch_size=$((1024 / L))"
    for pol in mask zero; do
      reeval "$R/lengths_L$L" "*/bias=offset,*" "eval_$pol.json" "offset ($pol beyond L)" \
        "+bias_overrides.policy=$pol" "${LENGTHS_EVAL[@]}"
    done
    plot "lengths_L$L" "Trained at L = $L (batch $((1024 / L)): 1024 tokens per step)" "$R/lengths_L$L"
  done
}
sensitivity() {
  extra=(${bias_free[@]+"${bias_free[@]}"})
  local common=(+experiment=extrapolation_quick seed=0,1,2 "eval.modes=[nonoverlap]")
  train "$R/sens_fire" "${common[@]}" bias=fire bias.threshold=64,2048 'label=fire (threshold ${bias.threshold})'
  train "$R/sens_xpos" "${common[@]}" bias=xpos bias.scale_base=64,2048 'label=xpos (scale_base ${bias.scale_base})'
  train "$R/sens_sandwich" "${common[@]}" bias=sandwich bias.dim=8,128 'label=sandwich (dim ${bias.dim})'
  plot sensitivity "Sensitivity: FIRE threshold, xPos scale_base, Sandwich d' (defaults: the quick preset)" \
    "$R/sens_fire" "$R/sens_xpos" "$R/sens_sandwich" "$R/quick/bias=fire,*/**/results.json" \
    "$R/quick/bias=xpos,*/**/results.json" "$R/quick/bias=sandwich,*/**/results.json"
}
context() {  # does a scheme use the context beyond L? The same runs and targets with every
  # key at an offset >= L (64) masked (eval.key_window), seeds 0-2
  local s inputs=()
  for s in alibi kerple_log kerple_power sandwich fire t5 rope none; do
    reeval "$R/quick" "*/bias=$s,*seed=[012]*" eval_window.json "$s (keys < 64)" \
      eval.key_window=64 "${CONTEXT_EVAL[@]}"  # 64: the quick preset's train.length
    [ -d "$R/quick" ] || continue  # the same runs (seeds 0-2), with and without the window
    while IFS= read -r -d '' f; do inputs+=("$f"); done < <(find "$R/quick" \
      -path "*/bias=$s,*seed=[012]*" \( -name results.json -o -name eval_window.json \) -print0 | sort -z)
  done
  plot context "Context beyond L: the quick runs, and the same runs with keys at offsets >= L masked" \
    "${inputs[@]}"
}
alibi_lengths() {  # ALiBi trained at 64, 128, 256 and sinusoidal at 64, scored to 3072
  extra=(${bias_free[@]+"${bias_free[@]}"})
  local L
  for L in 64 128 256; do
    train "$R/alibi_lengths/alibi_L$L" +experiment=extrapolation_alibi_lengths \
      "train.length=$L" "train.batch_size=$((1024 / L))"
  done
  train "$R/alibi_lengths/sinusoidal_L64" +experiment=extrapolation_alibi_lengths bias=sinusoidal
  for L in 64 256; do  # the control: 4x the tokens a step (4096), 2 seeds
    train "$R/alibi_lengths/alibi_L${L}_4096" +experiment=extrapolation_alibi_lengths \
      "train.length=$L" "train.batch_size=$((4096 / L))" seed=0,1 \
      "label=alibi (trained at $L, 4096 tokens a step)"
  done
  plot alibi_lengths "ALiBi trained at 64, 128, 256 and sinusoidal at 64 (1024 tokens a step; control: 4096), scored to 3072" \
    "$R/alibi_lengths"
}
alibi_heads() {  # ALiBi with 8 heads (slopes 1/2..1/256) in the quick setting, and the same
  # runs with every key at an offset >= 64 masked (as the context preset)
  extra=(${bias_free[@]+"${bias_free[@]}"})
  train "$R/alibi_heads8" +experiment=extrapolation_quick bias=alibi model.num_heads=8 \
    seed=0,1,2 "label=alibi (8 heads)"
  reeval "$R/alibi_heads8" "*" eval_window.json "alibi (8 heads, keys < 64)" \
    eval.key_window=64 "${CONTEXT_EVAL[@]}"
  plot alibi_heads "ALiBi with 8 heads in the quick setting, with and without keys at offsets >= 64" \
    "$R/alibi_heads8"
}
content() {  # the schemes that read the content, in the quick preset (3 seeds), beside
  # the quick runs of alibi, rope, t5 and none
  extra=(${bias_free[@]+"${bias_free[@]}"})
  train "$R/content" +experiment=extrapolation_quick \
    bias=fox,ssmax,hard_alibi,dape,cope,stickbreaking seed=0,1,2
  local s inputs=("$R/content/**/results.json")
  for s in alibi rope t5 none; do
    inputs+=("$R/quick/bias=$s,*/**/results.json")
  done
  plot content "Schemes that read the content (3 seeds) beside alibi, rope, t5 and none (5)" \
    "${inputs[@]}"
}

case "$preset" in
  quick|ablation|lengths|alibi_lengths|alibi_heads|sensitivity|context|content) "$preset" ;;
  all) quick; ablation; lengths; alibi_lengths; alibi_heads; sensitivity; context; content ;;
  paper|paper_reduced)
    train "$R/$preset" "+experiment=extrapolation_$preset"
    plot "$preset" "$([ "$preset" = paper ] && echo "Paper preset: GPT-2-small-like LM trained at 512 tokens" \
      || echo "Reduced paper preset: medium LM trained at 512 tokens, bf16")" "$R/$preset" ;;
  *) echo "usage: $0 [quick|ablation|lengths|alibi_lengths|alibi_heads|sensitivity|context|content|all|paper_reduced|paper] [relpos-train overrides...]" >&2
     exit 2 ;;
esac
echo "finished in $(( $(date +%s) - start )) s"
