#!/usr/bin/env bash
# The newer methods' CIFAR-100 tables: OFD, ReviewKD, DKD, DIST, KD+CTKD, KD+LS, DKD+LS, MLKD, MLKD+LS (both with
# MLKD's two views), MLKD-std (its loss, one view), SimKD, WTTM on RepDistiller's 13 teacher/student pairs, each
# with its published recipe. The flags and the source of every value are in helper/published/newer_recipes.md.
#
#   scripts/run_cifar_newer.sh                  every method on every pair
#   scripts/run_cifar_newer.sh dkd kd+ls        only these methods
#   DRY_RUN=1 scripts/run_cifar_newer.sh        print the commands, run nothing
#
# Environment:
#   TRIALS   trials per cell (default 1: trial ids 1..TRIALS; the seed follows the trial id)
#   GPUS     comma-separated device ids (default 0); each device runs its share of the commands one by one
#   EPOCHS   epochs per run (default 240); other values scale the LR decay epochs (150/180/210 of 240)
#   DRY_RUN  1 prints the commands instead of running them
#   PYTHON   interpreter (default python)
# Teachers are read from save/models/<arch>_vanilla/ckpt_epoch_240.pth. Every run passes --resume auto, so
# running the script again continues interrupted runs.
set -euo pipefail
cd "$(dirname "$0")/.."

TRIALS=${TRIALS:-1}
GPUS=${GPUS:-0}
EPOCHS=${EPOCHS:-240}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python}

METHODS=(ofd reviewkd dkd dist kd+ctkd kd+ls dkd+ls mlkd mlkd+ls mlkd-std simkd wttm)
# RepDistiller's tables 1 (same family) and 2 (across families), teacher then student.
SAME_FAMILY=("wrn_40_2 wrn_16_2" "wrn_40_2 wrn_40_1" "resnet56 resnet20" "resnet110 resnet20"
             "resnet110 resnet32" "resnet32x4 resnet8x4" "vgg13 vgg8")
CROSS_FAMILY=("vgg13 MobileNetV2" "ResNet50 MobileNetV2" "ResNet50 vgg8" "resnet32x4 ShuffleV1"
              "resnet32x4 ShuffleV2" "wrn_40_2 ShuffleV1")

# DKD's NCKD weight: mdistiller configs/cifar100/dkd/*.yaml (8 where no config exists).
dkd_beta() {
  case "$1>$2" in
    "resnet56>resnet20" | "resnet110>resnet32") echo 2 ;;
    "wrn_40_2>wrn_16_2" | "wrn_40_2>wrn_40_1" | "vgg13>vgg8" | "vgg13>MobileNetV2") echo 6 ;;
    *) echo 8 ;;
  esac
}

# ReviewKD's loss weight: official CIFAR-100/script/reviewKD.sh (5, mdistiller's reviewkd.yaml, elsewhere).
reviewkd_weight() {
  case "$1>$2" in
    "resnet56>resnet20") echo 0.6 ;;
    "resnet110>resnet32") echo 1 ;;
    "resnet32x4>ShuffleV2") echo 8 ;;
    *) echo 5 ;;
  esac
}

# KD+LS base temperature and KD weight: LS-KD README log names (2 and 9, tools/train.py defaults, elsewhere).
ls_kd() {
  case "$1>$2" in
    "vgg13>vgg8" | "vgg13>MobileNetV2") echo "3 9" ;;
    "ResNet50>MobileNetV2") echo "3 1" ;;
    *) echo "2 9" ;;
  esac
}

# MLKD's schedule, configs/cifar100/ours/*.yaml: "epochs lr" (240 and 0.025 where no config exists:
# resnet110->resnet20, ResNet50->vgg8). The 480-epoch configs keep the LR decay at 150/180/210.
mlkd_schedule() {
  case "$1>$2" in
    "resnet32x4>ShuffleV1" | "resnet32x4>ShuffleV2") echo "480 0.01" ;;
    "ResNet50>MobileNetV2" | "vgg13>MobileNetV2" | "wrn_40_2>ShuffleV1") echo "480 0.0025" ;;
    *) echo "240 0.025" ;;
  esac
}

# The one-view MLKD loss under the standard protocol: MLKD's lr for the same-family pairs, RepDistiller's else.
mlkd_std_lr() {
  local pair
  for pair in "${SAME_FAMILY[@]}"; do
    if [[ "$pair" == "$1 $2" ]]; then
      echo " --learning_rate 0.025"
      return
    fi
  done
}

# Epochs of one run: EPOCHS, doubled for MLKD's 480-epoch configs.
run_epochs() {
  local e lr
  case "$1" in
    mlkd | mlkd+ls)
      read -r e lr <<<"$(mlkd_schedule "$2" "$3")"
      echo $((EPOCHS * e / 240))
      ;;
    *) echo "$EPOCHS" ;;
  esac
}

# WTTM's power gamma (--ttm_l) and loss weight beta (-b): the WTTM paper's appendix A.4, Table 8 (arXiv 2402.11148v2).
wttm_values() {
  case "$1>$2" in
    "wrn_40_2>wrn_16_2") echo "0.1 4" ;;
    "wrn_40_2>wrn_40_1" | "resnet32x4>resnet8x4") echo "0.1 3" ;;
    "resnet56>resnet20") echo "0.3 1.5" ;;
    "resnet110>resnet20") echo "0.2 2" ;;
    "resnet110>resnet32") echo "0.1 1.5" ;;
    "vgg13>vgg8") echo "0.1 2.25" ;;
    "vgg13>MobileNetV2") echo "0.2 3" ;;
    "ResNet50>MobileNetV2") echo "0.2 5" ;;
    "ResNet50>vgg8") echo "0.1 2" ;;
    "resnet32x4>ShuffleV1") echo "0.2 1.4" ;;
    "resnet32x4>ShuffleV2") echo "0.4 16" ;;
    "wrn_40_2>ShuffleV1") echo "0.3 3" ;;
    *) echo "0.2 4" ;; # no published value: the TTM README's WTTM+CRD setting
  esac
}

recipe() { # method teacher student -> train_student.py flags
  local method=$1 teacher=$2 student=$3 T W G E L
  case "$method" in
    ofd) echo "--distill ofd -r 1 -a 0 -b 0.001" ;;
    reviewkd) echo "--distill reviewkd -r 1 -a 0 -b $(reviewkd_weight "$teacher" "$student")" ;;
    dkd) echo "--distill dkd -r 1 -a 0 -b 1 --dkd_beta $(dkd_beta "$teacher" "$student")" ;;
    dist) echo "--distill dist -r 1 -a 0 -b 1" ;;
    kd+ctkd) echo "--distill kd --ctkd -r 0.1 -a 0.9 -b 0" ;;
    kd+ls)
      read -r T W <<<"$(ls_kd "$teacher" "$student")"
      echo "--distill kd --logit_stand --base_temp $T -r 0.1 -a $W -b 0"
      ;;
    dkd+ls) echo "--distill dkd --logit_stand --base_temp 2 -r 1 -a 0 -b 9 --dkd_beta $(dkd_beta "$teacher" "$student")" ;;
    mlkd)
      read -r E L <<<"$(mlkd_schedule "$teacher" "$student")"
      echo "--distill mlkd --two_views -r 0.1 -a 0 -b 0.9 --learning_rate $L"
      ;;
    mlkd+ls)
      read -r E L <<<"$(mlkd_schedule "$teacher" "$student")"
      echo "--distill mlkd --two_views --logit_stand --base_temp 2 -r 0.1 -a 0 -b 9 --learning_rate $L"
      ;;
    mlkd-std) echo "--distill mlkd -r 0.2 -a 0 -b 0.9$(mlkd_std_lr "$teacher" "$student")" ;;
    simkd) echo "--distill simkd -r 0 -a 0 -b 1" ;;
    wttm)
      read -r G W <<<"$(wttm_values "$teacher" "$student")"
      echo "--distill wttm -r 1 -a 0 -b $W --ttm_l $G"
      ;;
    *)
      echo "unknown method '$method'; one of: ${METHODS[*]}" >&2
      return 1
      ;;
  esac
}

# The run folder holds --distill, -r/-a/-b and the trial, not the modifier flags: label the trial so that
# KD+CTKD does not share KD's folder. The digits (the seed) stay those of the trial.
trial_id() {
  case "$1" in
    *+ctkd) echo "ctkd_$2" ;;
    *+ls) echo "ls_$2" ;;
    *) echo "$2" ;;
  esac
}

schedule=""
if [[ "$EPOCHS" != 240 ]]; then
  schedule=" --lr_decay_epochs $((EPOCHS * 5 / 8)),$((EPOCHS * 3 / 4)),$((EPOCHS * 7 / 8))"
fi

selected=("$@")
if [[ ${#selected[@]} -eq 0 ]]; then
  selected=("${METHODS[@]}")
fi

commands=()
for method in "${selected[@]}"; do
  recipe "$method" x y >/dev/null # fail early on an unknown name
  for pair in "${SAME_FAMILY[@]}" "${CROSS_FAMILY[@]}"; do
    read -r teacher student <<<"$pair"
    flags=$(recipe "$method" "$teacher" "$student")
    for ((trial = 1; trial <= TRIALS; trial++)); do
      commands+=("$PYTHON train_student.py --path_t ./save/models/${teacher}_vanilla/ckpt_epoch_240.pth"`
        `" --model_s $student $flags --trial $(trial_id "$method" "$trial")"`
        `" --epochs $(run_epochs "$method" "$teacher" "$student")$schedule --resume auto")
    done
  done
done

IFS=, read -r -a devices <<<"$GPUS"
n=${#devices[@]}

if [[ "$DRY_RUN" == 1 ]]; then
  for i in "${!commands[@]}"; do
    echo "CUDA_VISIBLE_DEVICES=${devices[i % n]} ${commands[i]}"
  done
  exit 0
fi

# One queue per device, run in parallel; a failed run is reported and the queue goes on.
for d in "${!devices[@]}"; do
  (
    for ((i = d; i < ${#commands[@]}; i += n)); do
      # shellcheck disable=SC2086  # the command is a list of plain words
      CUDA_VISIBLE_DEVICES="${devices[d]}" ${commands[i]} || echo "FAILED: ${commands[i]}" >&2
    done
  ) &
done
wait
