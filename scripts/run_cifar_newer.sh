#!/usr/bin/env bash
# The newer methods' CIFAR-100 tables: OFD, ReviewKD, DKD, DIST, KD+CTKD, KD+LS, DKD+LS, MLKD, MLKD+LS (both with
# MLKD's two views), MLKD-std (its loss, one view), SimKD, WTTM, ITRD, WTTM+ITRD (one run, --add) on RepDistiller's
# 13 teacher/student pairs, each with its published recipe. The flags and the source of every value are in helper/published/newer_recipes.md.
#
#   scripts/run_cifar_newer.sh                                  # every method on every pair
#   scripts/run_cifar_newer.sh dkd kd+ls                        # only these methods
#   TRIALS="1 2 3" GPUS="0 1" JOBS_PER_GPU=2 scripts/run_cifar_newer.sh
#   scripts/run_cifar_newer.sh --dry-run --methods "mlkd wttm" --pairs "resnet32x4:resnet8x4"
#
# Options (flag or environment variable), besides those listed in scripts/queue.sh:
#   --methods "a b"   METHODS          a subset of: ofd reviewkd dkd dist kd+ctkd kd+ls dkd+ls mlkd mlkd+ls
#                                      mlkd-std simkd wttm itrd wttm+itrd catkd wkdf (default: all); names may also be
#                                      given as arguments (catkd skips the pairs it cannot serve: MobileNetV2 and
#                                      ShuffleV2 students)
#   --pairs "t:s ..." PAIRS            teacher:student pairs (default: the 13 published ones)
#   TEACHER_DIR / TEACHER_TEMPLATE     where the teachers are, as in scripts/run_cifar_distill.sh
# EPOCHS shortens every schedule (MLKD's 480-epoch recipes to twice EPOCHS) and scales the LR decay epochs
# (150/180/210 of 240) with it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/queue.sh
source scripts/queue.sh

ALL_METHODS=(ofd reviewkd dkd dist kd+ctkd kd+ls dkd+ls mlkd mlkd+ls mlkd-std simkd wttm itrd wttm+itrd catkd wkdf)
PAIRS="${PAIRS:-$PUBLISHED_PAIRS}"
METHODS="${METHODS:-}"
TRIALS="${TRIALS:-1}"
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
    -*)
      if ! queue_option "$@"; then
        echo "error: unknown option $1 (see --help)" >&2
        exit 2
      fi
      shift "$QUEUE_SHIFT"
      ;;
    *)
      METHODS="$METHODS $1"
      shift
      ;;
  esac
done
queue_check_options
BASE_EPOCHS="${EPOCHS:-240}"

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
  if [[ " $SAME_FAMILY_PAIRS " == *" $1:$2 "* ]]; then echo " --learning_rate 0.025"; fi
}

# Epochs of one run: EPOCHS, doubled for MLKD's 480-epoch configs.
run_epochs() {
  local e lr
  case "$1" in
    mlkd | mlkd+ls)
      read -r e lr <<<"$(mlkd_schedule "$2" "$3")"
      echo $((BASE_EPOCHS * e / 240))
      ;;
    *) echo "$BASE_EPOCHS" ;;
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

# CAT-KD's weight, map resolution and normalisation: CAT-KD configs/cifar100/CAT_KD/*.yaml (CAT_loss_weight,
# CAM_RESOLUTION, IF_NORMALIZE); mdistiller/engine/cfg.py defaults (400, 2, True) where no config exists. Empty:
# a pair whose student has a layer between its last map and its classifier (catkd refuses it).
catkd_values() {
  case "$1>$2" in
    "resnet56>resnet20") echo "0.7 2 0" ;;
    "resnet110>resnet32") echo "1.8 2 0" ;;
    "wrn_40_2>wrn_16_2") echo "12 2 0" ;;
    "wrn_40_2>wrn_40_1") echo "1.5 2 0" ;;
    "resnet32x4>resnet8x4") echo "15 2 0" ;;
    "vgg13>vgg8") echo "4.5 2 0" ;;
    "resnet32x4>ShuffleV1") echo "600 4 1" ;;
    "wrn_40_2>ShuffleV1") echo "80 4 1" ;;
    *">MobileNetV2" | *">ShuffleV2") echo "" ;;
    *) echo "400 2 1" ;;
  esac
}

# WKD-F's weight, mean/covariance ratio and grid: WKD configs/cifar100/wkd_f/*.yaml (WKD_FEAT_WEIGHT,
# MEAN_COV_RATIO, SPATIAL_GRID); the resnet32x4->resnet8x4 values (the method's defaults) where no config exists.
wkdf_values() {
  case "$1>$2" in
    "wrn_40_2>ShuffleV1") echo "0.3 3 4" ;;
    *) echo "0.08 4 1" ;;
  esac
}

# ITRD's weights and Renyi order: ITRD README.md's command (roymiles/ITRD 5d08c6b).
ITRD_FLAGS="--lambda_corr 2 --lambda_mutual 1 --alpha_it 1.01"

recipe() { # method teacher student -> train_student.py flags
  local method=$1 teacher=$2 student=$3 T W G L
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
      read -r _ L <<<"$(mlkd_schedule "$teacher" "$student")"
      echo "--distill mlkd --two_views -r 0.1 -a 0 -b 0.9 --learning_rate $L"
      ;;
    mlkd+ls)
      read -r _ L <<<"$(mlkd_schedule "$teacher" "$student")"
      echo "--distill mlkd --two_views --logit_stand --base_temp 2 -r 0.1 -a 0 -b 9 --learning_rate $L"
      ;;
    mlkd-std) echo "--distill mlkd -r 0.2 -a 0 -b 0.9$(mlkd_std_lr "$teacher" "$student")" ;;
    simkd) echo "--distill simkd -r 0 -a 0 -b 1" ;;
    wttm)
      read -r G W <<<"$(wttm_values "$teacher" "$student")"
      echo "--distill wttm -r 1 -a 0 -b $W --ttm_l $G"
      ;;
    # ITRD README.md's command; WTTM+ITRD: WTTM's per-pair values with ITRD added at that weight (the TTM README
    # gives no per-pair values for the combination).
    itrd) echo "--distill itrd -r 1 -a 0 -b 1 $ITRD_FLAGS" ;;
    wkdf)
      read -r W R G <<<"$(wkdf_values "$teacher" "$student")"
      echo "--distill wkdf -r 1 -a 0 -b $W --wkdf_ratio $R --wkdf_grid $G"
      ;;
    catkd)
      read -r W R N <<<"$(catkd_values "$teacher" "$student")"
      if [[ -n "${W:-}" ]]; then echo "--distill catkd -r 1 -a 0 -b $W --cat_resolution $R --cat_normalize $N"; fi
      ;;
    wttm+itrd)
      read -r G W <<<"$(wttm_values "$teacher" "$student")"
      echo "--distill wttm -r 1 -a 0 -b $W --ttm_l $G --add itrd:1 $ITRD_FLAGS"
      ;;
    *)
      echo "unknown method '$method'; one of: ${ALL_METHODS[*]}" >&2
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


selected=()
for name in $METHODS; do
  if [[ " ${ALL_METHODS[*]} " != *" $name "* ]]; then
    echo "error: unknown method '$name'; valid: ${ALL_METHODS[*]}" >&2
    exit 2
  fi
done
for name in "${ALL_METHODS[@]}"; do
  if [[ -z "${METHODS// /}" || " $METHODS " == *" $name "* ]]; then selected+=("$name"); fi
done

# The decay epochs at 5/8, 3/4 and 7/8 of the schedule, at least epoch 1 (the engine needs positive epochs).
schedule=()
if [[ "$BASE_EPOCHS" != 240 ]]; then
  decay=()
  for frac in "5 8" "3 4" "7 8"; do
    read -r num den <<<"$frac"
    e=$((BASE_EPOCHS * num / den))
    decay+=($((e > 0 ? e : 1)))
  done
  schedule=(--lr_decay_epochs "${decay[0]},${decay[1]},${decay[2]}")
fi

read -r -a pairs <<<"$PAIRS"
read -r -a trials <<<"$TRIALS"
for trial in "${trials[@]}"; do
  for pair in "${pairs[@]}"; do
    if [[ "$pair" != *:* ]]; then
      echo "error: pair '$pair' is not teacher:student" >&2
      exit 2
    fi
    teacher=${pair%%:*} student=${pair#*:}
    queue_teacher_path "$teacher"
    for method in "${selected[@]}"; do
      read -r -a flags <<<"$(recipe "$method" "$teacher" "$student")"
      if ((${#flags[@]} == 0)); then continue; fi # the method cannot serve this pair
      epochs=$(run_epochs "$method" "$teacher" "$student")
      queue_add "S-${student}_T-${teacher}_${method}_${trial}${EPOCHS:+_ep$EPOCHS}" \
        "$PYTHON" train_student.py --path_t "$TEACHER_PATH" --model_s "$student" "${flags[@]}" \
        --trial "$(trial_id "$method" "$trial")" --epochs "$epochs" "${schedule[@]}" --resume auto "${EXTRA_ARGS[@]}"
    done
  done
done
queue_check_teachers
queue_run
