#!/usr/bin/env bash
# The main job on the bundled tiny default: demo-world records, a tokenizer, and training
# configs/demo.py on this machine. Extra arguments go to caip-demo (e.g. --workdir DIR).
source "$(dirname "$0")/setup.sh"
exec caip-demo --workdir workdirs/demo "$@"
