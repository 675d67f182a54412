#!/usr/bin/env bash
# The checks that need CUDA GPUs, in one command (CI has no GPU): the test suite on the GPU (its CUDA
# tests run instead of skipping), the CTR kernel against cuDNN, a compiled CUDA-graphed training step per
# variant family, and with 2+ GPUs two DDP runs (launched, CUDA-graphed) and two FSDP2 runs (eager, compiled)
# under torchrun.
# Correctness only: the timings these print are not results (bench.py and docs/bench.md are).
#
#   bash tools/gpu_check.sh            # over 10 min on 2 H200s (its pytest phase alone: 11+, test_quality and
#                                      # test_ra_contract the longest); a PASS/FAIL line per check, last
#   QUICK=1 bash tools/gpu_check.sh    # the test suite without the slow end-to-end runs
#   CHECKS="ctr_kernel ddp_graph" bash tools/gpu_check.sh         # only these checks (names as printed)
#   FILES="tests/test_train.py tests/test_bench.py" CHECKS=pytest bash tools/gpu_check.sh   # these test files, started
#                                                    # in this order (the longest first finishes the phase soonest)
# (CHECKS and FILES split it over several shorter sessions, e.g. a device call's 10-minute limit.)
# Logs go to $LOGS (default runs/gpu-check/), the suite's per test file in $LOGS/pytest/.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast off (README)
export WANDB_MODE=${WANDB_MODE:-disabled} PYTHONUNBUFFERED=1
LOGS=${LOGS:-runs/gpu-check}
mkdir -p "$LOGS"
if ! NGPU=$(python -c "import torch; print(torch.cuda.device_count())"); then
    echo "gpu_check: \`python\` cannot import torch; activate the environment that setup.sh installed into"; exit 2
fi
if [ "$NGPU" -lt 1 ]; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda.device_count() == 0); run it on a GPU machine"; exit 2
fi
results=()
CHECKS=${CHECKS:-all}
check() {  # name, command...: run it, log to $LOGS/name.log, remember PASS/FAIL (only the names in $CHECKS)
    local name=$1; shift
    if [ "$CHECKS" != all ] && [[ " $CHECKS " != *" $name "* ]]; then return; fi
    echo "== $name: $*"
    if "$@" > "$LOGS/$name.log" 2>&1; then results+=("PASS $name"); else results+=("FAIL $name (see $LOGS/$name.log)"); fi
    tail -n 3 "$LOGS/$name.log"
}
TINY="--preset tiny --dataset synthetic-recall --max-steps 40 --eval-every 20 --out-dir $LOGS/runs --overwrite"

# every test file, the longest ones (on 2 H200s) first, so that the phase ends soonest
LONGEST="tests/test_quality.py tests/test_ra_contract.py tests/test_bench.py tests/test_ddp_overlap.py tests/test_train.py"
test_files() {
    printf '%s\n' $LONGEST
    ls tests/test_*.py | grep -vxF -f <(printf '%s\n' $LONGEST)
}

# the suite one test file per process, $JOBS at once (a GPU machine has the cores; the suite in one process
# takes ~10 min there), each with its own temp folder (pytest prunes other processes' numbered ones)
pytest_files() {
    local marker=() rc=0
    [ -n "${QUICK:-}" ] && marker=(-m "not slow")
    mkdir -p "$LOGS/pytest"
    { if [ -n "${FILES:-}" ]; then printf '%s\n' $FILES; else test_files; fi; } | xargs -P "${JOBS:-8}" -I{} sh -c 'n=$(basename {} .py); python -m pytest -q -rfEs \
        -p no:cacheprovider --basetemp="$0/tmp-$n" "$@" {} > "$0/$n.log" 2>&1; echo "$? {}"' \
        "$LOGS/pytest" "${marker[@]}" > "$LOGS/pytest/rc.txt"
    sort -k2 "$LOGS/pytest/rc.txt"
    # this run's files only (an earlier run's logs may lie beside them)
    local logs=$(awk -v d="$LOGS/pytest" '{n = $2; sub(/.*\//, "", n); sub(/\.py$/, "", n); print d "/" n ".log"}' \
        "$LOGS/pytest/rc.txt")
    tail -qn 1 $logs
    # exit 5: every test of the file deselected (QUICK)
    awk '$1 != 0 && $1 != 5 {bad = 1} END {exit bad}' "$LOGS/pytest/rc.txt" || rc=1
    grep -h "^FAILED\|^ERROR" $logs
    return $rc
}
check pytest pytest_files
check ctr_kernel python tests/gpu_check_ctr.py --quick
check step_graph python bench.py --what step --compile --cuda-graph --no-eager --step-reps 5 \
    --variants ra_same_flop,ra_headsel,ra_exact,ra_ctr_headsel,ra_exact_headsel
check train_graph python train.py $TINY --attn ra_headsel --compile --cuda-graph --run-name graph
if [ "$NGPU" -ge 2 ]; then
    check ddp torchrun --standalone --nproc_per_node=2 train.py $TINY --attn ra_same_flop --compile --run-name ddp
    check ddp_graph torchrun --standalone --nproc_per_node=2 train.py $TINY --attn ra_same_flop --compile --cuda-graph \
        --run-name ddp-graph
    check fsdp torchrun --standalone --nproc_per_node=2 train.py $TINY --attn ra_same_flop --fsdp --run-name fsdp
    check fsdp_compile torchrun --standalone --nproc_per_node=2 train.py $TINY --attn ra_same_flop --fsdp --compile \
        --run-name fsdp-compile
else
    results+=("SKIP ddp, ddp_graph, fsdp, fsdp_compile (one GPU)")
fi
printf '%s\n' "${results[@]}"
! printf '%s\n' "${results[@]}" | grep -q '^FAIL'
