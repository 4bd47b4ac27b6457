#!/usr/bin/env bash
# Train, with cross-entropy only (train_teacher.py), every model of RepDistiller's CIFAR-100 tables:
# its six teachers and the nine students trained alone (the "Teacher" and "Student (vanilla)" rows).
#
#   scripts/run_cifar_vanilla.sh                           # every model, trial 0, 240 epochs
#   TRIALS="0 1 2" GPUS="0 1" scripts/run_cifar_vanilla.sh # 3 seeds, runs spread over 2 GPUs
#   scripts/run_cifar_vanilla.sh --dry-run --epochs 5 --models "resnet20 resnet56" -- --amp bf16
#
# Options (flag or environment variable), besides those listed in scripts/queue.sh:
#   --models "a b"   MODELS   a subset of the 15 models (default: all)
# Runs land in save/models/<model>_cifar100_lr_<lr>_decay_0.0005_trial_<t>[_ep<E>]/; train_student.py reads
# a teacher from such a folder as well (pass its ckpt_epoch_240.pth as --path_t).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/queue.sh
source scripts/queue.sh

# RepDistiller's teachers (its fetch_pretrained_teachers.sh) and its vanilla students (its README tables).
TEACHER_MODELS=(wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50)
STUDENT_MODELS=(resnet8x4 resnet20 resnet32 wrn_16_2 wrn_40_1 vgg8 MobileNetV2 ShuffleV1 ShuffleV2)
MODELS="${MODELS:-${TEACHER_MODELS[*]} ${STUDENT_MODELS[*]}}"
TRIALS="${TRIALS:-0}" # RepDistiller's train_teacher.py default trial

while (($#)); do
    case "$1" in
        -h | --help)
            queue_usage
            exit 0
            ;;
        --models)
            MODELS="$2"
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

read -r -a models <<<"$MODELS"
read -r -a trials <<<"$TRIALS"
for trial in "${trials[@]}"; do
    for model in "${models[@]}"; do
        queue_add "${model}_trial_${trial}${EPOCHS:+_ep$EPOCHS}" \
            "$PYTHON" train_teacher.py --model "$model" --trial "$trial" "${COMMON_FLAGS[@]}"
    done
done
queue_run
