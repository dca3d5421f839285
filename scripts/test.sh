#!/usr/bin/env bash
# The test suite on CPU, two workers. Extra arguments go to pytest (e.g. -k loss, -m "not slow").
source "$(dirname "$0")/setup.sh"
exec python -m pytest -n 2 "$@"
