#!/bin/bash
# Variants of the tiny recipe trained side by side on one device, each then scored by hw6 evaluate; a summary at
# the end. On an H200 nine runs went ~12 steps/s each beside the others (1,500 steps: 2 minutes).
# usage: bench/recipes.sh DEVICE SCALE TRAIN_TIMEOUT_S [RUNS_FILE]
#   RUNS_FILE: one run per line, a name then its `hw6 train` flags ('#' starts a comment); default: the first
#   sweep, bench/sweeps/gpu_2026-12-04.txt. e.g. bench/recipes.sh cuda 1 900 bench/sweeps/arch_2026-12-04.txt;
#   a dry run on the CPU: EVAL_ARGS="--num_inference_steps 1" bench/recipes.sh cpu 0.001 300 FILE
# SCALE multiplies every run's steps; a run still training at TRAIN_TIMEOUT_S gets Ctrl-C (it saves, then is scored).
# PY (default .venv/bin/python) runs hw6utils; W (default outputs/recipes) holds the runs, their logs and a shared cache.
DEV=$1; SCALE=$2; TT=$3; FILE=${4:-bench/sweeps/gpu_2026-12-04.txt}; PY=${PY:-.venv/bin/python}; W=${W:-outputs/recipes}
mkdir -p $W
hw6() { $PY -m hw6utils.cli "$@"; }
steps() { $PY -c "print(max(2, round($1 * $SCALE)))"; }
common="--preset tiny --device $DEV --cache_dir $W/cache --num_threads 1 --eval_freq 0 --save_freq 100000"
declare -A RUNS
while read -r name args; do
  [[ -z $name || $name == \#* ]] || RUNS[$name]=$args
done < $FILE
# one warm-up per image size: it builds the shapes set and encodes that size's cache, which the runs then share
for size in $(for a in "${RUNS[@]}"; do echo $a | grep -oE -- "--image_size [0-9]+ --sample_size [0-9]+" || echo default; done | sort -u | tr ' ' '@'); do
  echo "[sweep] warm-up ${size//@/ }: shapes set and caches"; date
  flags=${size//@/ }; [[ $flags == default ]] && flags=""
  hw6 train $common $flags --output_dir $W/warm --max_steps 1 > $W/warm.log 2>&1 || { tail -20 $W/warm.log; exit 1; }
done
date
for name in "${!RUNS[@]}"; do
  args=${RUNS[$name]}
  n=$(echo $args | sed -E 's/.*--max_steps ([0-9]+).*/\1/'); s=$(steps $n)
  args=$(echo $args | sed -E "s/--max_steps [0-9]+/--max_steps $s/")
  ( start=$(date +%s)
    timeout -s INT -k 20 $TT $PY -m hw6utils.cli train $common --output_dir $W/$name $args > $W/$name.train.log 2>&1
    echo "train rc $? after $(( $(date +%s) - start )) s" >> $W/$name.train.log
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
