#!/usr/bin/env bash
# Here, before a device lease: export a clean tree of HEAD (uncommitted edits stay home) into .devw/gb/tree
# with its commit in COMMIT (the copy has no .git, so benches read LORAD_BENCH_COMMIT from it), plus the
# call scripts. Then carry `.devw/gb .devw/whl .devw/site` (see README.md).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .devw/gb/tree && mkdir -p .devw/gb/tree
git archive HEAD | tar -x -C .devw/gb/tree
git rev-parse HEAD > .devw/gb/tree/COMMIT
du -sh .devw/gb .devw/whl .devw/site
