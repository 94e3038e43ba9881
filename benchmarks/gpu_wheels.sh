#!/usr/bin/env bash
# Wheels of what a GPU machine's image may lack (or hold too old) for benchmarks/gpu_check.sh, into .whl/ (ignored),
# at the versions of this project's venv: pure-Python wheels, fetched without their dependencies (the image's torch,
# numpy, tokenizers, ... stay). Run where the package registry can be reached; carry .whl/ to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
for name in transformers diffusers huggingface_hub webdataset braceexpand jsonargparse docstring_parser \
  typeshed_client importlib_metadata; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "$name==$version"
done
du -sh .whl
