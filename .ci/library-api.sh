#!/usr/bin/env bash
# The library's public API as an adopter's documentation shows it
# (`cargo doc --no-default-features --features auth`: its items and the
# inherent methods of its structs and enums), against the list in
# .ci/library-api.txt: an item that appears or disappears fails CI until the
# list is updated on purpose (`.ci/library-api.sh --write`).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet --no-default-features --features auth
items=$(python3 - "${CARGO_TARGET_DIR:-target}/doc/m2m_gateway/all.html" <<'PY'
import re, sys
page = open(sys.argv[1]).read()
import os
root = os.path.dirname(sys.argv[1])
for section, body in re.findall(r'<h3 id="([a-z-]+)">.*?</h3><ul class="all-items">(.*?)</ul>', page, re.S):
    for href, name in re.findall(r'href="([^"]+)">([^<]+)<', body):
        print(f"{section} {name}")
        # The inherent methods a type's page shows (not trait or blanket ones).
        if section in ("structs", "enums"):
            item = open(os.path.join(root, href)).read()
            inherent = item.split('id="implementations-list"', 1)
            if len(inherent) == 2:
                inherent = re.split(r'id="(?:trait|synthetic|blanket)-implementations', inherent[1])[0]
                for method in sorted(set(re.findall(r'id="method\.([a-z_0-9]+)"', inherent))):
                    print(f"methods {name}::{method}")
PY
)
if [ "${1:-}" = "--write" ]; then
  printf '%s\n' "$items" | sort > .ci/library-api.txt
  exit 0
fi
if ! diff <(printf '%s\n' "$items" | sort) .ci/library-api.txt; then
  echo "the auth library's public API changed (< now, > .ci/library-api.txt); if on purpose: .ci/library-api.sh --write" >&2
  exit 1
fi
echo "library API: $(printf '%s\n' "$items" | wc -l) items, as listed"
