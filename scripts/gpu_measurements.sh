#!/usr/bin/env bash
# The GPU measurements the README quotes, one task after another, for a CUDA host whose jobs have a wall-clock limit:
#
#   DEADLINE_S=570 RESULTS=DIR bash scripts/gpu_measurements.sh [TASK...]
#
# (on an air-gapped host: bash scripts/offline_bundle.sh run llm,toy bash scripts/gpu_measurements.sh). Tasks, in
# the order given (default, all in this order): 05a (05a default, cold: its own empty LLM cache), bench_lora (stacked LoRA, K = 8, 5 repeats;
# bench_lora_tf32, not in the default list: the same with TF32 matmuls in both arms; gpu_tests, not in the default
# list: the CUDA tests of tests/integration/test_llm_models.py, GPU against CPU on tiny random models, output in tasks.log;
# bench_sweep, not in the default list: study 04's full grid sweep on cuda, 3 cold repeats, toy bundle only),
# toy_smoke (studies 01-04, smoke params, DEVICE=cuda), bench_stacked (stacked toy training, 3 repeats), 05b (gpu.yaml,
# the five-seed result run). A finished task is marked in .cache/gpu_measurements/done and skipped by the next
# invocation on the same host; a task that does not fit the time left is deferred; 05b is interrupted (SIGINT)
# MARGIN_S (default 25) seconds before the deadline and resumes from its adapter and generation caches when invoked again. Each task's result
# (a tar of its output folder or the bench's JSON) and the logs go to RESULTS (default .cache/gpu_results), with
# every invocation's task times appended to RESULTS/history.log (how cold times over several invocations add up), and
# the 05a/05b kernels' progress bars (each long step with its elapsed time) to RESULTS/05a_kernel.log, 05b_kernel.log
# (PERSONA_WM_KERNEL_LOG): where an interrupted run spent its time. Where a process started in its own session
# (setsid ... &) outlives the job that started it, start this script that way once, with RESULTS outside the job's
# scratch folder, and let later jobs only wait for it and copy RESULTS: it then runs uninterrupted, and nothing is
# resumed (05b's result run of 2026-12-07 ran so; copy a task's tar only after its "end" line in driver.log).
set -u
T0=$(date +%s); LIMIT=${DEADLINE_S:-100000}
RESULTS=${RESULTS:-.cache/gpu_results}; D=.cache/gpu_measurements
mkdir -p "$D/done" "$RESULTS"
left() { echo $(( T0 + LIMIT - $(date +%s) )); }
log() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*" | tee -a "$RESULTS/driver.log"; }
LOG=$RESULTS/tasks.log
{ timeout 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 120 python3 -c "import sys,torch,transformers,peft;print(sys.version.split()[0],torch.__version__,transformers.__version__,peft.__version__)"
} >"$RESULTS/env.txt" 2>&1
task() {  # task NAME NEED_S CMD...: run CMD unless done, or fewer than NEED_S seconds are left
    local name=$1 need=$2 s rc; shift 2
    [[ -f $D/done/$name ]] && return 0
    if (( $(left) < need )); then log "defer $name: $(left) s left < $need"; return 1; fi
    log "start $name ($(left) s left)"; s=$(date +%s)
    echo "===== $name $(date +%T)" >>"$LOG"
    # straight into the log, no pipe: a child left behind by a killed task would hold a pipe open past the deadline
    timeout -s INT -k 20 $(( $(left) - ${MARGIN_S:-25} )) "$@" >>"$LOG" 2>&1; rc=$?
    echo "$(date -u +%FT%T) $name seconds=$(( $(date +%s) - s )) rc=$rc" | tee -a "$RESULTS/history.log" >>"$D/history.log"
    log "end $name rc=$rc in $(( $(date +%s) - s )) s"
    (( rc == 0 )) && touch "$D/done/$name"
    return $rc
}
R="python3 -m persona_wm.io.runner"
OUTS=.cache/gpu_outputs
TASKS=("$@"); (( ${#TASKS[@]} )) || TASKS=(05a bench_lora toy_smoke bench_stacked 05b)
for TASK in "${TASKS[@]}"; do
    case $TASK in
        05a) task 05a 200 env PERSONA_WM_LLM_CACHE="$D/cold-05a-llm-cache" PERSONA_WM_KERNEL_LOG="$RESULTS/05a_kernel.log" $R --study 05a_llm_persona_geometry \
                 --params default --device cuda --output-root "$OUTS" \
             && tar -C "$OUTS" -czf "$RESULTS/05a_cuda.tgz" 05a_llm_persona_geometry ;;
        bench_lora) task bench_lora 90 python3 -m persona_wm.bench --device cuda --sections lora_stacked \
                 --llm smollm2-shape --lora-ks 8 --repeats 5 --output "$RESULTS/bench_lora.json" ;;
        bench_lora_tf32) task bench_lora_tf32 90 python3 -m persona_wm.bench --device cuda --sections lora_stacked \
                 --llm smollm2-shape --lora-ks 8 --repeats 5 --matmul-precision high \
                 --output "$RESULTS/bench_lora_tf32.json" ;;
        toy_smoke) task toy_smoke 120 env PERSONA_WM_MODEL_CACHE="$D/cold-toy-cache" $R --study 01_sfp_definition \
                 02_steering_specificity 03_em_reversal 04_persona_engineering --params smoke --device cuda \
                 --output-root "$OUTS/smoke" \
             && tar -C "$OUTS/smoke" -czf "$RESULTS/toy_smoke_cuda.tgz" --exclude='*.html' --exclude='*.ipynb' . ;;
        bench_stacked) task bench_stacked 200 python3 -m persona_wm.bench --device cuda --sections stacked \
                 --ns 8,64,256 --seq-models 2 --repeats 3 --output "$RESULTS/bench_stacked.json" ;;
        bench_sweep) task bench_sweep 240 python3 -m persona_wm.bench --device cuda --sections sweep --repeats 3 \
                 --output "$RESULTS/bench_sweep.json" ;;
        gpu_tests) task gpu_tests 60 python3 -m pytest -q tests/integration/test_llm_models.py -k cuda ;;
        05b) task 05b 60 env PERSONA_WM_KERNEL_LOG="$RESULTS/05b_kernel.log" $R --study 05b_llm_finetuning --params gpu --device cuda --output-root "$OUTS" \
             && tar -C "$OUTS" -czf "$RESULTS/05b_gpu.tgz" 05b_llm_finetuning_gpu ;;
        *) log "unknown task '$TASK' (tasks: 05a bench_lora bench_lora_tf32 toy_smoke bench_stacked bench_sweep gpu_tests 05b)"; exit 2 ;;
    esac
done
log "done so far: $(ls "$D/done" | tr '\n' ' ')"
