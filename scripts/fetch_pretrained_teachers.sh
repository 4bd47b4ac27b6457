#!/usr/bin/env bash
# Fetch RepDistiller's CIFAR-100 teachers into save/models/<arch>_vanilla/ckpt_epoch_240.pth (the layout
# RepDistiller's own fetch script wrote, so its commands find them) and check each one's test accuracy.
#
#   scripts/fetch_pretrained_teachers.sh                          # wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50
#   scripts/fetch_pretrained_teachers.sh --from ../shared/teachers # teachers already on disk (linked, then checked)
#   scripts/fetch_pretrained_teachers.sh --models resnet56 --source chenyaofo
#
# Sources, in order: mdistiller's GitHub release archive, RepDistiller's original server (down since 2022),
# chenyaofo/pytorch-cifar-models (ResNet-20/32/44/56). All options: scripts/fetch_pretrained_teachers.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/fetch_teachers.py "$@"
