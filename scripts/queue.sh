# shellcheck shell=bash
# A job queue for the run_cifar_*.sh scripts (sourced by them, not run on its own).
#
# Each command runs in one "slot": a GPU (CUDA_VISIBLE_DEVICES=<id>) repeated JOBS_PER_GPU times, or, without
# GPUS, JOBS_PER_GPU slots on the default device. A new command starts as soon as a slot frees (`wait -n`).
# Output of each run goes to $LOG_DIR/<name>.log; failures are listed at the end (exit status 1).
# Ctrl-C or SIGTERM is passed on to the runs, which save a checkpoint and stop; the same command resumes them,
# because every run gets `--resume auto` (finished runs exit at once with "already finished").
#
# Options shared by the scripts (flag, or environment variable):
#   --trials "0 1 2"    TRIALS        trial ids; each run's seed is derived from its trial
#   --gpus "0 1"        GPUS          GPU ids (default: none; the engine picks cuda if available, else cpu)
#   --jobs-per-gpu N    JOBS_PER_GPU  runs at once per GPU (default 1)
#   --epochs N          EPOCHS        override the 240-epoch schedule (runs get their own folders: _ep<N>)
#   --log-dir DIR       LOG_DIR       per-run logs (default save/logs)
#   --dry-run           DRY_RUN=1     print the commands, run nothing
#   -- FLAGS...         EXTRA         more flags for every run, e.g. -- --amp bf16 --channels_last
# PYTHON picks the interpreter (default .venv/bin/python if present, else python3).

# Bash >= 4.3 for `wait -n`.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 3))); then
    echo "error: these scripts need bash >= 4.3 (found $BASH_VERSION)" >&2
    exit 2
fi

TRIALS="${TRIALS:-}"
GPUS="${GPUS:-}"
JOBS_PER_GPU="${JOBS_PER_GPU:-1}"
EPOCHS="${EPOCHS:-}"
LOG_DIR="${LOG_DIR:-save/logs}"
DRY_RUN="${DRY_RUN:-0}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# EXTRA is split on whitespace on purpose: it holds several flags.
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
JOB_NAMES=()
JOB_CMDS=()

# --help of a script: its header comment, then the shared options below.
queue_usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    sed -n '/^# Options shared/,/^# PYTHON/p' scripts/queue.sh | sed 's/^# \{0,1\}//'
}

# Teachers of the distillation scripts: queue_teacher_path ARCH sets TEACHER_PATH (TEACHER_TEMPLATE with {arch}
# replaced) and notes it if missing; queue_check_teachers then stops before any run (not in a dry run).
MISSING_TEACHERS=()
queue_teacher_path() {
    TEACHER_PATH=${TEACHER_TEMPLATE//\{arch\}/$1}
    if [[ ! -f "$TEACHER_PATH" && " ${MISSING_TEACHERS[*]} " != *" $TEACHER_PATH "* ]]; then
        MISSING_TEACHERS+=("$TEACHER_PATH")
    fi
}

queue_check_teachers() {
    if [[ "$DRY_RUN" != 1 && ${#MISSING_TEACHERS[@]} -gt 0 ]]; then
        echo "error: missing teacher checkpoint(s):" >&2
        printf '  %s\n' "${MISSING_TEACHERS[@]}" >&2
        echo "fetch them with scripts/fetch_pretrained_teachers.sh, or train them with scripts/run_cifar_vanilla.sh" \
            "and point TEACHER_TEMPLATE at them (see --help)" >&2
        exit 1
    fi
}

# Parse one shared option at "$1"; sets QUEUE_SHIFT (read by the calling script) to the number of words used.
# Returns 1 if the option is not a shared one.
# shellcheck disable=SC2034
queue_option() {
    QUEUE_SHIFT=2
    case "$1" in
        --trials | --gpus | --jobs-per-gpu | --epochs | --log-dir)
            if (($# < 2)); then
                echo "error: $1 needs a value" >&2
                exit 2
            fi
            case "$1" in
                --trials) TRIALS="$2" ;;
                --gpus) GPUS="$2" ;;
                --jobs-per-gpu) JOBS_PER_GPU="$2" ;;
                --epochs) EPOCHS="$2" ;;
                --log-dir) LOG_DIR="$2" ;;
            esac
            ;;
        --dry-run) DRY_RUN=1 QUEUE_SHIFT=1 ;;
        --)
            shift
            EXTRA_ARGS+=("$@")
            QUEUE_SHIFT=$(($# + 1))
            ;;
        *) return 1 ;;
    esac
}

queue_check_options() {
    if ! [[ "$JOBS_PER_GPU" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: JOBS_PER_GPU/--jobs-per-gpu must be a positive integer, got '$JOBS_PER_GPU'" >&2
        exit 2
    fi
    if [[ -n "$EPOCHS" && ! "$EPOCHS" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: EPOCHS/--epochs must be a positive integer, got '$EPOCHS'" >&2
        exit 2
    fi
}

# The flags every run gets: resume (skips finished runs), the epochs override, then EXTRA.
queue_common_flags() {
    COMMON_FLAGS=(--resume auto)
    if [[ -n "$EPOCHS" ]]; then COMMON_FLAGS+=(--epochs "$EPOCHS"); fi
    COMMON_FLAGS+=("${EXTRA_ARGS[@]}")
}

# queue_add NAME COMMAND...: add one run (the command is stored shell-quoted).
queue_add() {
    local name=$1
    shift
    JOB_NAMES+=("$name")
    JOB_CMDS+=("$(printf '%q ' "$@")")
}

_queue_slots() {
    SLOTS=()
    local gpu k
    local -a gpus
    read -r -a gpus <<<"$GPUS"
    if ((${#gpus[@]} == 0)); then gpus=(""); fi
    for gpu in "${gpus[@]}"; do
        for ((k = 0; k < JOBS_PER_GPU; k++)); do SLOTS+=("$gpu"); done
    done
}

# One run in the background: its own log, its status recorded, SIGTERM/SIGINT passed on to it.
_queue_job() {
    local gpu=$1 name=$2 cmd=$3 failed=$4
    local log="$LOG_DIR/$name.log" status=0 start=$SECONDS child stopped=0
    if [[ -n "$gpu" ]]; then export CUDA_VISIBLE_DEVICES="$gpu"; fi
    echo "[start] ${gpu:+gpu $gpu: }$name"
    # exec: the background process is the run itself, so a signal reaches it directly.
    eval "exec $cmd" >"$log" 2>&1 &
    child=$!
    trap 'stopped=1; kill -TERM "$child" 2>/dev/null || true' TERM INT
    wait "$child" || status=$?
    # A signal interrupts `wait`; wait again until the run has saved its checkpoint and exited.
    while kill -0 "$child" 2>/dev/null; do
        status=0
        wait "$child" || status=$?
    done
    if ((stopped)); then
        echo "[stopped] $name (exit $status; log $log)"
    elif ((status == 0)); then
        echo "[done]  $name ($((SECONDS - start)) s)"
    else
        echo "[FAILED] $name (exit $status; log $log)"
        echo "$name (exit $status): $log" >>"$failed"
    fi
}

_queue_stop() {
    trap '' INT TERM
    echo "stopping: each run saves a checkpoint; run the same command again to resume" >&2
    local pid
    for pid in "${SLOT_PIDS[@]}"; do
        if [[ -n "$pid" ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    wait || true
    exit 130
}

# Run (or with DRY_RUN=1 print) every added command.
queue_run() {
    _queue_slots
    local i slot n=${#JOB_CMDS[@]}
    if [[ "$DRY_RUN" == 1 ]]; then
        for i in "${!JOB_CMDS[@]}"; do
            local gpu=${SLOTS[i % ${#SLOTS[@]}]}
            echo "${gpu:+CUDA_VISIBLE_DEVICES=$gpu }${JOB_CMDS[i]% }"
        done
        echo "# $n runs (dry run; nothing started)" >&2
        return 0
    fi
    mkdir -p "$LOG_DIR"
    local failed
    failed=$(mktemp)
    SLOT_PIDS=()
    for slot in "${!SLOTS[@]}"; do SLOT_PIDS[slot]=""; done
    trap _queue_stop INT TERM
    echo "$n runs on ${#SLOTS[@]} slot(s); logs in $LOG_DIR"
    for i in "${!JOB_CMDS[@]}"; do
        while :; do
            for slot in "${!SLOTS[@]}"; do
                local pid=${SLOT_PIDS[slot]}
                if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then break 2; fi
            done
            wait -n || true # a run finished (its status is recorded by _queue_job)
        done
        _queue_job "${SLOTS[slot]}" "${JOB_NAMES[i]}" "${JOB_CMDS[i]}" "$failed" &
        SLOT_PIDS[slot]=$!
    done
    wait || true
    trap - INT TERM
    local n_failed
    n_failed=$(wc -l <"$failed")
    echo "$((n - n_failed)) of $n runs finished"
    if ((n_failed > 0)); then
        echo "failed runs:" >&2
        cat "$failed" >&2
        rm -f "$failed"
        return 1
    fi
    rm -f "$failed"
}

# The distillation scripts' main program: their RECIPE_METHODS / RECIPE / TRIAL_PREFIX block (generated from
# helper/published/recipes.csv) on PAIRS x TRIALS. Options: the shared ones, --methods "a b" (or method names as
# arguments), --pairs "t:s ...". A pair without its own RECIPE line uses the method's "*" line; "skip": none.
# EPOCHS scales each recipe's epochs (MLKD's 960 to 4 x EPOCHS) and moves the decay epochs to 5/8, 3/4, 7/8.
queue_recipes_main() {
    PAIRS="${PAIRS:-$RECIPE_PAIRS}" METHODS="${METHODS:-}" TRIALS="${TRIALS:-1}"
    TEACHER_DIR="${TEACHER_DIR:-./save/models}"
    TEACHER_TEMPLATE="${TEACHER_TEMPLATE:-$TEACHER_DIR/{arch\}_vanilla/ckpt_epoch_240.pth}"
    while (($#)); do
        case "$1" in
            -h | --help) queue_usage && exit 0 ;;
            --methods | --pairs)
                if (($# < 2)); then echo "error: $1 needs a value" >&2 && exit 2; fi
                if [[ "$1" == --methods ]]; then METHODS="$2"; else PAIRS="$2"; fi
                shift 2
                ;;
            -*)
                if ! queue_option "$@"; then echo "error: unknown option $1 (see --help)" >&2 && exit 2; fi
                shift "$QUEUE_SHIFT"
                ;;
            *) METHODS="$METHODS $1" && shift ;;
        esac
    done
    queue_check_options
    local name pair trial
    for name in $METHODS; do
        if [[ " ${RECIPE_METHODS[*]} " != *" $name "* ]]; then
            echo "error: unknown method '$name'; valid: ${RECIPE_METHODS[*]}" >&2
            exit 2
        fi
    done
    SELECTED=()
    for name in "${RECIPE_METHODS[@]}"; do
        if [[ -z "${METHODS// /}" && " ${RECIPE_OPTIONAL[*]} " != *" $name "* || " $METHODS " == *" $name "* ]]; then
            SELECTED+=("$name")
        fi
    done
    read -r -a pairs <<<"$PAIRS"
    read -r -a trials <<<"$TRIALS"
    declare -gA SKIPPED=()
    for trial in "${trials[@]}"; do
        for pair in "${pairs[@]}"; do
            if [[ "$pair" != *:* ]]; then echo "error: pair '$pair' is not teacher:student" >&2 && exit 2; fi
            queue_teacher_path "${pair%%:*}"
            for name in "${SELECTED[@]}"; do _queue_recipe "$name" "$pair" "$trial"; done
        done
    done
    for name in "${!SKIPPED[@]}"; do
        echo "# $name skipped on ${SKIPPED[$name]} pair(s): no published number there" >&2
    done
    queue_check_teachers
    queue_run
}

# One recipe on one pair: its flags, the EPOCHS override, then queue_add.
_queue_recipe() {
    local name=$1 pair=$2 trial=$3 i e
    local spec=${RECIPE["$name|$pair"]:-${RECIPE["$name|*"]}}
    if [[ "$spec" == skip ]]; then SKIPPED[$name]=$((${SKIPPED[$name]:-0} + 1)) && return 0; fi
    local -a flags
    read -r -a flags <<<"$spec"
    if [[ -n "$EPOCHS" && "$EPOCHS" != "$RECIPE_STANDARD_EPOCHS" ]]; then
        local found=0
        for i in "${!flags[@]}"; do
            if [[ "${flags[i]}" == --epochs ]]; then
                flags[i + 1]=$(((e = flags[i + 1] * EPOCHS / RECIPE_STANDARD_EPOCHS) > 0 ? e : 1)) found=1
            fi
        done
        if ((!found)); then flags+=(--epochs "$EPOCHS"); fi
        local decay=() frac num den
        for frac in "${RECIPE_DECAY_FRACTIONS[@]}"; do
            read -r num den <<<"$frac"
            decay+=($(((e = EPOCHS * num / den) > 0 ? e : 1)))
        done
        flags+=(--lr_decay_epochs "$(IFS=, && echo "${decay[*]}")")
    fi
    queue_add "S-${pair#*:}_T-${pair%%:*}_${name}_${trial}${EPOCHS:+_ep$EPOCHS}" \
        "$PYTHON" train_student.py --path_t "$TEACHER_PATH" --model_s "${pair#*:}" "${flags[@]}" \
        --trial "${TRIAL_PREFIX[$name]:-}$trial" --resume auto "${EXTRA_ARGS[@]}"
}
