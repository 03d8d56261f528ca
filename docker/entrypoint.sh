#!/bin/sh
# Container entrypoint: batch inference over $BRATS_INPUT (/input) into $BRATS_OUTPUT (/output).
# All arguments are passed on to `python -m app.inference.batch` (run it with --help for the list).
# The model is $BRATS_CKPT when set. Otherwise it is model.ts in $BRATS_MODELS (/models), or the
# model.pt there when no model.ts is mounted. A BRATS_CKPT the user set is never swapped for another
# file: a misspelt path must fail, not run a different model.
set -eu
if [ -z "${BRATS_CKPT:-}" ]; then
    models="${BRATS_MODELS:-/models}"
    BRATS_CKPT="${models}/model.ts"
    if [ ! -e "${BRATS_CKPT}" ] && [ -e "${models}/model.pt" ]; then
        BRATS_CKPT="${models}/model.pt"
    fi
    export BRATS_CKPT
fi
exec python -m app.inference.batch "$@"
