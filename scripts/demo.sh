#!/usr/bin/env bash
# The main job on the bundled tiny default (configs/demo.py).
source "$(dirname "$0")/setup.sh"
caip-model-info --config configs/demo.py --forward --batch 8
