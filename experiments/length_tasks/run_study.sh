#!/usr/bin/env bash
# The task study (README.md says what was run and what it showed): every base scheme x
# 3 seeds on copy and assoc_recall (L = 32) and passkey (L = 128); the offset table's
# trained weights with the mask policy; LM passkey retrieval (quick LM preset, 4
# schemes, seed 0); Ruoss et al. (2023)'s reverse string as an anchor; assoc_recall
# pilots, then with random queries at 8,000 steps (every scheme x 3 seeds) and three
# controls: 1..4 pairs at every length (task.pairs=4), RoPE at lr 3e-3, ALiBi and
# Sandwich at 16,000 steps.
# The content-reading schemes on copy. plot_assoc redraws the assoc_recall parts alone.
#   experiments/length_tasks/run_study.sh [tasks|policies|lm_passkey|anchor|assoc_pilot|
#                                          assoc_budget|assoc_random|assoc_random_seeds|
#                                          assoc_random_rest|assoc_longer|
#                                          content_tasks|plot|plot_assoc|all]
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
anchor() {  # Ruoss et al. 2023's reverse string: binary, input sizes U{1..40}, tested to
  # 491 (2n + 2 tokens: train.length 82 holds n <= 40, 12x = 984 holds n <= 491). Their
  # model's shape (5 layers, width 64, 8 heads, batch 128) and output slots: every answer
  # position reads a blank (task.teacher_forcing=false), so the answer is predicted from
  # the input alone, all at once. Not theirs: causal attention (they use an encoder),
  # 2,000 steps at lr 1e-3 (they train 1M+ steps at 1e-4..5e-4, 10 seeds), one seed.
  local A=(task=reverse task.symbols=2 task.teacher_forcing=false model.d_model=64
           model.num_layers=5 model.num_heads=8 train.batch_size=128 train.length=82
           train.steps=2000 train.checkpoint_every=1000 train.log_every=100
           train.progress=false optim.lr=1e-3 optim.warmup_steps=100 eval.progress=false
           "eval.task_multiples=[1,2,4,6,12]" seed=0)
  relpos-train -m "${A[@]}" bias=none,sinusoidal,learned_abs,rope,alibi \
    hydra.sweep.dir=$HERE/runs/anchor_reverse 'hydra.sweep.subdir=${bias.name}'
  local b
  for b in sinusoidal rope; do  # positions: a sorted random subset of [0, 2048) per row
    relpos-train "${A[@]}" bias=$b train.randomized_positions=2048 "label=$b (randomized)" \
      hydra.run.dir=$HERE/runs/anchor_reverse_randomized/$b
  done
}
assoc_pilot() {  # is assoc_recall learned with 128 keys (the fewest that 16x holds) and
  # 2.5x the steps? alibi and rope, seed 0
  relpos-train -m task=assoc_recall task.keys=128 bias=alibi,rope train.length=32 \
    train.steps=3000 train.checkpoint_every=3000 "${COMMON[@]/seed=0,1,2/seed=0}" \
    hydra.sweep.dir=$HERE/runs/assoc_pilot
}
assoc_budget() {  # is it the budget or the shape? alibi, 128 keys, seed 0: 15,000 steps at
  # the pilot's shape, and 5,000 steps at lr 1e-3 with width 64/128 x 2/4 layers
  local P=(task=assoc_recall task.keys=128 bias=alibi train.length=32 train.batch_size=32
           train.log_every=500 train.progress=false optim.warmup_steps=50 eval.progress=false
           model.num_heads=4 seed=0)
  relpos-train -m "${P[@]}" model.d_model=64 model.num_layers=2 train.steps=15000 \
    train.checkpoint_every=5000 hydra.sweep.dir=$HERE/runs/assoc_long
  relpos-train -m "${P[@]}" model.d_model=64,128 model.num_layers=2,4 optim.lr=1e-3 \
    train.steps=5000 train.checkpoint_every=5000 hydra.sweep.dir=$HERE/runs/assoc_shape
}
# assoc_recall with random queries (task.queries=random, the default: no elimination),
# 64 keys (8x = 63 pairs), batch 128 at lr 1e-3: the setting of every run below
RQ=(task=assoc_recall task.keys=64 task.queries=random "eval.task_multiples=[1,2,4,8]"
    train.length=32 train.batch_size=128 train.log_every=250 train.progress=false
    optim.lr=1e-3 optim.warmup_steps=200 model.d_model=64 model.num_layers=2
    model.num_heads=4 eval.progress=false)
assoc_random() {  # a pilot (alibi, seed 0, 4,000 steps) learned the lookup after ~2,000
  # steps. What was run: every scheme x seed 0 at 3,000 steps, then 6 schemes x seed 0
  # and 3 x seed 1 at 8,000 steps.
  relpos-train -m "${RQ[@]}" seed=0 bias=$SCHEMES train.steps=3000 train.checkpoint_every=3000 \
    hydra.sweep.dir=$HERE/runs/assoc_random
  relpos-train -m "${RQ[@]}" seed=0 bias=alibi,offset,rope,t5,kerple_log,none train.steps=8000 \
    train.checkpoint_every=4000 hydra.sweep.dir=$HERE/runs/assoc_random_long
  relpos-train -m "${RQ[@]}" seed=1 bias=alibi,rope,kerple_log train.steps=8000 \
    train.checkpoint_every=4000 hydra.sweep.dir=$HERE/runs/assoc_random_long
}
one_rq() {  # one run of the setting, 8,000 steps unless overridden: sweep dir, overrides
  local dir=$1; shift
  relpos-train -m "${RQ[@]}" train.steps=8000 train.checkpoint_every=4000 "$@" \
    hydra.sweep.dir=$HERE/runs/$dir </dev/null
}
queue_rq() {  # core, then "dir:overrides" jobs, run one after another, single-threaded
  local core=$1 job; shift
  for job in "$@"; do
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      taskset -c "$core" bash -c "$(declare -p RQ HERE); $(declare -f one_rq); one_rq ${job/:/ }"
  done
}
GRID=assoc_random_long PAIRS="assoc_pairs:task.pairs=4"
assoc_random_seeds() {  # more of the 8,000-step grid and two controls (task.pairs=4 and
  # RoPE at lr 3e-3), as two queues of single-threaded runs, one per core (1.4x the
  # throughput of one 2-thread run on 2 cores, measured over 400 steps), in priority order:
  # every scheme at seed 0, the controls, the lookup learners' seed 2, then seeds 1 and 2
  # of the others. Each run takes about 10 minutes beside the other.
  local L=$GRID P=$PAIRS lr="assoc_random_lr:optim.lr=3e-3"
  queue_rq 0 "$L:bias=sandwich seed=0" "$L:bias=fire seed=0" "$L:bias=learned_abs seed=0" \
    "$P bias=alibi seed=0" "$L:bias=alibi seed=2" "$L:bias=rope seed=2" "$L:bias=t5 seed=1" \
    "$L:bias=none seed=1" "$L:bias=t5 seed=2" "$L:bias=none seed=2" &
  queue_rq 1 "$L:bias=kerple_power seed=0" "$L:bias=xpos seed=0" "$L:bias=sinusoidal seed=0" \
    "$lr bias=rope seed=0" "$L:bias=kerple_log seed=2" "$P bias=alibi seed=1" \
    "$L:bias=offset seed=1" "$L:bias=sandwich seed=1" "$L:bias=offset seed=2" \
    "$L:bias=sandwich seed=2" &
  wait
}
assoc_random_rest() {  # the grid's last 10 runs (seeds 1-2 of 5 schemes) and the pairs
  # control for RoPE and KERPLE-log (seed 0), the same two queues
  local L=$GRID P=$PAIRS
  queue_rq 0 "$L:bias=kerple_power seed=1" "$L:bias=fire seed=1" "$L:bias=learned_abs seed=1" \
    "$L:bias=fire seed=2" "$L:bias=learned_abs seed=2" "$P bias=rope seed=0" &
  queue_rq 1 "$L:bias=kerple_power seed=2" "$L:bias=xpos seed=1" "$L:bias=sinusoidal seed=1" \
    "$L:bias=xpos seed=2" "$L:bias=sinusoidal seed=2" "$P bias=kerple_log seed=0" &
  wait
}
assoc_longer() {  # did the falls beyond L come from runs not yet converged at 8,000
  # steps? ALiBi and Sandwich seeds 0 and 1, then the KERPLEs' seed 0 (KERPLE-log's fell,
  # KERPLE-power's did not learn), at 16,000 steps (the cosine schedule stretched)
  local L=assoc_random_16k S=train.steps=16000
  queue_rq 0 "$L:bias=alibi seed=0 $S" "$L:bias=sandwich seed=0 $S" "$L:bias=kerple_log seed=0 $S" &
  queue_rq 1 "$L:bias=alibi seed=1 $S" "$L:bias=sandwich seed=1 $S" "$L:bias=kerple_power seed=0 $S" &
  wait
}
content_tasks() {  # the schemes that read the content (CoPE, DAPE, FoX, stick-breaking,
  # SSMax, Hard-ALiBi) x 3 seeds on copy, in the tasks setting (passkey not run: a CoPE
  # passkey run takes about 10 times a base scheme's on 2 cores)
  relpos-train -m task=copy bias=fox,ssmax,hard_alibi,dape,cope,stickbreaking \
    train.length=32 train.steps=1200 train.checkpoint_every=1200 "${COMMON[@]}" \
    hydra.sweep.dir=$HERE/runs/copy_content
}
plot() {  # tasks and LMs apart: each figure's panels share one training length
  # one corpus per results file: copy and assoc_recall read none, passkey's filler is the corpus
  relpos-plot "inputs=[$HERE/runs/copy,$HERE/runs/assoc_recall]" \
    out_dir=$HERE/figures/synthetic merge_to=$HERE/results/synthetic.json \
    "title=Copy and associative recall (no corpus), trained at 32: 12 schemes x 3 seeds"
  relpos-plot "inputs=[$HERE/runs/passkey]" out_dir=$HERE/figures/passkey \
    merge_to=$HERE/results/passkey.json \
    "title=Passkey retrieval (corpus filler 159a1f4ae3bfb9ca), trained at 128: 12 schemes x 3 seeds"
  relpos-plot "inputs=[$HERE/runs/copy_content]" out_dir=$HERE/figures/content_copy \
    merge_to=$HERE/results/content_copy.json \
    "title=Copy (no corpus), trained at 32: the content-reading schemes (3 seeds)"
  relpos-plot "inputs=[$HERE/runs/lm]" out_dir=$HERE/figures/lm_passkey \
    merge_to=$HERE/results/lm_passkey.json "title=Passkey retrieval by LMs trained at 64"
  relpos-plot "inputs=[$HERE/runs/assoc_pilot]" out_dir=$HERE/figures/assoc_pilot \
    merge_to=$HERE/results/assoc_pilot.json \
    "title=assoc_recall, 128 keys, 3,000 steps, trained at 32 (seed 0)"
  relpos-plot "inputs=[$HERE/runs/anchor_reverse,$HERE/runs/anchor_reverse_randomized]" \
    out_dir=$HERE/figures/anchor merge_to=$HERE/results/anchor.json \
    "title=Reverse string (binary), Ruoss et al.'s shape, trained on n <= 40 (seed 0)"
  python $HERE/anchor_score.py $HERE/results/anchor.json > $HERE/results/anchor.md
  relpos-plot "inputs=[$HERE/runs/assoc_random]" out_dir=$HERE/figures/assoc_random \
    merge_to=$HERE/results/assoc_random.json \
    "title=assoc_recall, random queries, 64 keys, 3,000 steps, trained at 32 (seed 0)"
  plot_assoc
  python $HERE/assoc_by_query.py $HERE/runs/assoc_pilot/*/ $HERE/runs/assoc_long/*/ \
    $HERE/runs/assoc_shape/*/ > $HERE/results/assoc_by_query.md
}
plot_assoc() {  # the 8,000-step assoc_recall grid and its controls. Runs whose folders are
  # gone (earlier machines) are read back from results/*_earlier.*, beside those in runs/; a
  # run in both is refused (a repeated seed): move the *_earlier files aside to redo all.
  # A part with neither is left as committed.
  shopt -s nullglob
  local R=$HERE/results
  draw() {  # RUNS FIGURES RESULTS TITLE: relpos-plot of runs/RUNS and results/RESULTS_earlier.json
    local in=()
    [[ -f $R/$3_earlier.json ]] && in+=("$R/$3_earlier.json")
    [[ -d $HERE/runs/$1 ]] && in+=("$HERE/runs/$1")
    (( ${#in[@]} )) || return 0
    local IFS=,
    relpos-plot "inputs=[${in[*]}]" out_dir=$HERE/figures/$2 merge_to=$R/$3.json "title=$4"
  }
  lookup() {  # NAME OUT [--policy=P] RUN_DIRS...: assoc_lookup.py with results/NAME_earlier.md
    # (if kept) into OUT; OUT is left as it is when there are neither run folders nor those
    local name=$1 out=$2 a runs=0; shift 2
    local prev=(); [[ -f $R/${name}_earlier.md ]] && prev=(--previous=$R/${name}_earlier.md)
    for a in "$@"; do [[ $a == --* ]] || runs=1; done
    (( runs || ${#prev[@]} )) || return 0
    python $HERE/assoc_lookup.py "${prev[@]}" "$@" > "$out"
  }
  draw $GRID assoc_random_long assoc_random_long \
    "assoc_recall, random queries, 64 keys, 8,000 steps, trained at 32 (seeds in the legend)"
  lookup assoc_lookup $R/assoc_lookup.md $HERE/runs/$GRID/*/
  lookup assoc_lookup /dev/stdout --policy=mask $HERE/runs/$GRID/bias=offset,*/ \
    | tail -n +3 >> $R/assoc_lookup.md  # the same table with no attention beyond L
  draw assoc_pairs assoc_pairs assoc_pairs \
    "assoc_recall, 1..4 pairs and a gap (task.pairs=4), 8,000 steps, trained at 32 (seeds in the legend)"
  lookup assoc_pairs_lookup $R/assoc_pairs_lookup.md $HERE/runs/assoc_pairs/*/
  draw assoc_random_lr assoc_lr assoc_lr \
    "assoc_recall, random queries, RoPE at lr 3e-3, 8,000 steps, trained at 32 (seed 0)"
  lookup none $R/assoc_lr_lookup.md $HERE/runs/assoc_random_lr/*/
  draw assoc_random_16k assoc_16k assoc_16k \
    "assoc_recall, random queries, 64 keys, 16,000 steps, trained at 32 (seeds in the legend)"
  lookup none $R/assoc_16k_lookup.md $HERE/runs/assoc_random_16k/*/
}
case "${1:-all}" in
  tasks|policies|lm_passkey|anchor|assoc_pilot|assoc_budget|assoc_random|assoc_random_seeds|assoc_random_rest|assoc_longer|content_tasks|plot|plot_assoc) "$1" ;;
  all) tasks; policies; lm_passkey; anchor; assoc_pilot; assoc_budget; assoc_random; assoc_random_seeds; assoc_random_rest; assoc_longer; content_tasks; plot ;;
  *) echo "usage: $0 [tasks|policies|lm_passkey|anchor|assoc_pilot|assoc_budget|assoc_random|assoc_random_seeds|assoc_random_rest|assoc_longer|content_tasks|plot|plot_assoc|all]" >&2
     exit 2 ;;
esac
