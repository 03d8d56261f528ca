#!/bin/sh
# Container entrypoint: batch inference over $BRATS_INPUT (/input) into $BRATS_OUTPUT (/output).
# All arguments are passed on to `python -m app.inference.batch` (run it with --help for the list).
# If no checkpoint is at $BRATS_CKPT but a model.pt is mounted beside it, use that instead.
set -eu
if [ ! -e "${BRATS_CKPT}" ] && [ -e "$(dirname "${BRATS_CKPT}")/model.pt" ]; then
    BRATS_CKPT="$(dirname "${BRATS_CKPT}")/model.pt"
    export BRATS_CKPT
fi
exec python -m app.inference.batch "$@"
