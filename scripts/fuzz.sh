#!/bin/bash
# scripts/fuzz.sh: run every fuzz target of the module for FUZZTIME each
# (default 15s). A failing input is kept by go test under the package's
# testdata/fuzz/ and fails the run. Run through `make fuzz` (and `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-15s}
status=0
while IFS=: read -r file name; do
    pkg=./$(dirname "$file")
    echo "fuzz $pkg $name ($FUZZTIME)"
    if ! "$GO" test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" "$pkg" >/tmp/fuzz.$$.log 2>&1; then
        cat /tmp/fuzz.$$.log
        status=1
    fi
done < <(grep -rho --include='*_test.go' -H '^func Fuzz[A-Za-z0-9_]*' . | sed 's|^\./||; s|:func |:|' | sort)
rm -f /tmp/fuzz.$$.log
exit $status
