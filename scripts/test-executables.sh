#!/usr/bin/env bash
# Prints "name<TAB>executable" for each test target in cargo's JSON build
# messages (the output of `cargo test --no-run --message-format=json`, in
# file $1), one per line: with jq when there is one, else python3. Used by
# gpu-bundle.sh and barrier-audit.sh.
set -euo pipefail
messages="${1:?usage: test-executables.sh CARGO_MESSAGES_JSON}"
if command -v jq >/dev/null; then
    jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test
                  and (.target.kind | index("test"))) | "\(.target.name)\t\(.executable)"' "$messages"
else
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] and "test" in m["target"]["kind"]:
        print(m["target"]["name"] + "\t" + m["executable"])' "$messages"
fi
