#!/usr/bin/env bash
# The accelerator run (see benchmarks/gpu.py): writes ${OUT:-.}/gpu.json.
exec python "$(dirname "$0")/gpu.py" --json "${OUT:-.}/gpu.json" "$@"
