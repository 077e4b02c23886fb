#!/usr/bin/env bash
# Snakemake runs this inside the freshly created envs/memctl.yaml env (--software-deployment-method
# conda): install memctl itself, without dependencies (the env file has them), from the checkout.
# The checkout is $MEMCTL_SRC (the workflow sets it to the Snakefile's directory), else the first directory from the working directory upwards whose
# pyproject.toml names memctl (snakemake is usually run from the checkout).
set -euo pipefail
src="${MEMCTL_SRC:-}"
if [[ -z $src ]]; then
    dir="$PWD"
    while [[ $dir != / ]]; do
        if grep -qs '^name = "memctl"' "$dir/pyproject.toml"; then src="$dir"; break; fi
        dir="$(dirname "$dir")"
    done
fi
if [[ -z $src || ! -f $src/pyproject.toml ]]; then
    echo "memctl post-deploy: cannot find the memctl checkout from $PWD; set MEMCTL_SRC=/path/to/memctl" >&2
    exit 1
fi
python -m pip install --no-deps --no-build-isolation -e "$src" ||
    python -m pip install --no-deps -e "$src"
