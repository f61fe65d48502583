#!/bin/bash
# The tiny recipe's variants ("Recipes compared on a GPU" in the README) trained side by side on one device, each
# then scored by hw6 evaluate; a summary at the end. On an H200 each ran ~12 steps/s beside the others (1,500 steps:
# 2 minutes).
# usage: bench/recipes.sh DEVICE SCALE TRAIN_TIMEOUT_S
#   e.g. bench/recipes.sh cuda 1 900; a dry run on the CPU: EVAL_ARGS="--num_inference_steps 1" bench/recipes.sh cpu 0.001 300
# SCALE multiplies every run's steps; a run still training at TRAIN_TIMEOUT_S gets Ctrl-C (it saves, then is scored).
# PY (default .venv/bin/python) runs hw6utils; W (default outputs/recipes) holds the runs, their logs and a shared cache.
DEV=$1; SCALE=$2; TT=$3; PY=${PY:-.venv/bin/python}; W=${W:-outputs/recipes}
mkdir -p $W
hw6() { $PY -m hw6utils.cli "$@"; }
steps() { $PY -c "print(max(2, round($1 * $SCALE)))"; }
common="--preset tiny --device $DEV --cache_dir $W/cache --num_threads 1 --eval_freq 0 --save_freq 100000"
echo "[sweep] warm-up: shapes set and caches"; date
hw6 train $common --output_dir $W/warm --max_steps 1 > $W/warm.log 2>&1 || { tail -20 $W/warm.log; exit 1; }
date
declare -A RUNS=(
  [base1500_s0]="--max_steps 1500 --seed 0"
  [base1500_s1]="--max_steps 1500 --seed 1"
  [base3000_s0]="--max_steps 3000 --seed 0"
  [lr2.2e-3_s0]="--max_steps 1500 --lr 2.2e-3 --seed 0"
  [const_lr_s0]="--max_steps 1500 --lr_schedule constant --seed 0"
  [tmean1_s0]="--max_steps 1500 --timestep_mean 1.0 --seed 0"
  [vpred_s0]="--max_steps 1500 --prediction_type v_prediction --seed 0"
  [drop0.05_s0]="--max_steps 1500 --cond_drop_prob 0.05 --seed 0"
  [b32_750_s0]="--max_steps 750 --batch_size 32 --seed 0"
)
for name in "${!RUNS[@]}"; do
  args=${RUNS[$name]}
  n=$(echo $args | sed -E 's/.*--max_steps ([0-9]+).*/\1/'); s=$(steps $n)
  args=$(echo $args | sed -E "s/--max_steps [0-9]+/--max_steps $s/")
  ( timeout -s INT -k 20 $TT $PY -m hw6utils.cli train $common --output_dir $W/$name $args > $W/$name.train.log 2>&1
    echo "train rc $?" >> $W/$name.train.log
    hw6 evaluate --preset tiny --device $DEV --output_dir $W/$name --stage last $EVAL_ARGS > $W/$name.eval.log 2>&1
    if [[ $name == base1500* ]]; then
      hw6 evaluate --preset tiny --device $DEV --output_dir $W/$name --stage last --use_ema false $EVAL_ARGS >> $W/$name.eval.log 2>&1
    fi ) &
done
wait
date
for name in $(echo "${!RUNS[@]}" | tr ' ' '\n' | sort); do
  echo "=== $name: ${RUNS[$name]}"
  tr '\r' '\n' < $W/$name.train.log | grep -E "it/s|s/it" | tail -1
  grep -v -E "it/s|s/it|Warning|warn" $W/$name.train.log | tail -3
  tail -4 $W/$name.eval.log
done
