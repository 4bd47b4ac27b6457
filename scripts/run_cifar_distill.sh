#!/usr/bin/env bash
# Distil every method of RepDistiller's CIFAR-100 tables on each of their 13 teacher/student pairs, with the
# published loss weights (RepDistiller's scripts/run_cifar_distill.sh), plus CRD+KD.
#
#   scripts/run_cifar_distill.sh                               # 175 runs: 13 pairs x 13 settings + FSP on 6
#   TRIALS="1 2 3" GPUS="0 1 2 3" JOBS_PER_GPU=2 scripts/run_cifar_distill.sh
#   scripts/run_cifar_distill.sh --dry-run --methods "kd crd crd+kd" --pairs "resnet32x4:resnet8x4"
#
# Options (flag or environment variable), besides those listed in scripts/queue.sh:
#   --methods "a b"   METHODS          a subset of: kd hint attention similarity correlation vid rkd pkt abound
#                                      factor fsp nst crd crd+kd (default: all)
#   --pairs "t:s ..." PAIRS            teacher:student pairs (default: the 13 published ones)
#   TEACHER_DIR                        folder of the teachers (default ./save/models), read as
#                                      $TEACHER_DIR/<arch>_vanilla/ckpt_epoch_240.pth, the layout that
#                                      scripts/fetch_pretrained_teachers.sh writes
#   TEACHER_TEMPLATE                   any other layout, {arch} replaced by the teacher, e.g. teachers from
#                                      run_cifar_vanilla.sh:
#                                      './save/models/{arch}_cifar100_lr_0.05_decay_0.0005_trial_0/ckpt_epoch_240.pth'
# FSP needs equal channel counts in teacher and student; RepDistiller has no FSP number for wrn_40_2:wrn_40_1
# and the six cross-family pairs, and this script skips FSP on them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/queue.sh
source scripts/queue.sh

# The pairs on which FSP runs: those with FSP numbers in RepDistiller's tables.
FSP_PAIRS="wrn_40_2:wrn_16_2 resnet56:resnet20 resnet110:resnet20 resnet110:resnet32 resnet32x4:resnet8x4 vgg13:vgg8"
# name|--distill|weights, with RepDistiller's flag spelling (its scripts/run_cifar_distill.sh); -r defaults to 1.
METHOD_SPECS=(
    "kd|kd|-r 0.1 -a 0.9 -b 0"
    "hint|hint|-a 0 -b 100"
    "attention|attention|-a 0 -b 1000"
    "similarity|similarity|-a 0 -b 3000"
    "correlation|correlation|-a 0 -b 0.02"
    "vid|vid|-a 0 -b 1"
    "rkd|rkd|-a 0 -b 1"
    "pkt|pkt|-a 0 -b 30000"
    "abound|abound|-a 0 -b 1"
    "factor|factor|-a 0 -b 200"
    "fsp|fsp|-a 0 -b 50"
    "nst|nst|-a 0 -b 50"
    "crd|crd|-a 0 -b 0.8"
    "crd+kd|crd|-a 1 -b 0.8"
)
PAIRS="${PAIRS:-$PUBLISHED_PAIRS}"
METHODS="${METHODS:-}"
TRIALS="${TRIALS:-1}" # RepDistiller's train_student.py default trial
TEACHER_DIR="${TEACHER_DIR:-./save/models}"
TEACHER_TEMPLATE="${TEACHER_TEMPLATE:-$TEACHER_DIR/{arch\}_vanilla/ckpt_epoch_240.pth}"

while (($#)); do
    case "$1" in
        -h | --help)
            queue_usage
            exit 0
            ;;
        --methods | --pairs)
            if (($# < 2)); then
                echo "error: $1 needs a value" >&2
                exit 2
            fi
            if [[ "$1" == --methods ]]; then METHODS="$2"; else PAIRS="$2"; fi
            shift 2
            ;;
        *)
            if ! queue_option "$@"; then
                echo "error: unknown option $1 (see --help)" >&2
                exit 2
            fi
            shift "$QUEUE_SHIFT"
            ;;
    esac
done
queue_check_options
queue_common_flags

# Selected methods, in RepDistiller's order; unknown names are an error.
selected=()
for spec in "${METHOD_SPECS[@]}"; do
    name=${spec%%|*}
    if [[ -z "$METHODS" || " $METHODS " == *" $name "* ]]; then selected+=("$spec"); fi
done
known=" ${METHOD_SPECS[*]%%|*} "
for name in $METHODS; do
    if [[ "$known" != *" $name "* ]]; then
        echo "error: unknown method '$name'; valid:$known" >&2
        exit 2
    fi
done

read -r -a pairs <<<"$PAIRS"
read -r -a trials <<<"$TRIALS"
skipped_fsp=0
for trial in "${trials[@]}"; do
    for pair in "${pairs[@]}"; do
        if [[ "$pair" != *:* ]]; then
            echo "error: pair '$pair' is not teacher:student" >&2
            exit 2
        fi
        teacher=${pair%%:*} student=${pair#*:}
        queue_teacher_path "$teacher"
        for spec in "${selected[@]}"; do
            IFS='|' read -r name distill weights <<<"$spec"
            # FSP on a published pair without an FSP number: channel counts differ (RepDistiller: N/A).
            if [[ "$name" == fsp && " $PUBLISHED_PAIRS " == *" $pair "* && " $FSP_PAIRS " != *" $pair "* ]]; then
                skipped_fsp=$((skipped_fsp + 1))
                continue
            fi
            read -r -a weight_flags <<<"$weights"
            queue_add "S-${student}_T-${teacher}_${name}_${trial}${EPOCHS:+_ep$EPOCHS}" \
                "$PYTHON" train_student.py --path_t "$TEACHER_PATH" --distill "$distill" --model_s "$student" \
                "${weight_flags[@]}" --trial "$trial" "${COMMON_FLAGS[@]}"
        done
    done
done
if ((skipped_fsp > 0)); then
    echo "# fsp skipped on $skipped_fsp pair(s) whose channel counts differ (no FSP number published)" >&2
fi
queue_check_teachers
queue_run
