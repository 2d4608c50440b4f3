#!/usr/bin/env bash
# Builds the adopter crate the README's "Scopes declared in the .proto" recipe
# describes, from the README's own text (every block marked
# `<!-- adopter: PATH -->`), against this checkout (a path dependency instead
# of the version), and runs its test: the recipe cannot rot.
#   .ci/adopter.sh               build and test it in a scratch directory
#   .ci/adopter.sh --write DIR   only write the crate to DIR (benches/adopter-weight.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
if [ "${1:-}" = "--write" ]; then
  dir="$2"
  mkdir -p "$dir"
else
  dir="$(mktemp -d)"
  trap 'rm -rf "$dir"' EXIT
fi
python3 - "$dir" "$repo" <<'PY'
import pathlib, re, sys
dest, repo = pathlib.Path(sys.argv[1]), sys.argv[2]
text = pathlib.Path("README.md").read_text()
blocks = re.findall(r"<!-- adopter: (\S+) -->\n```[a-z]*\n(.*?)\n```", text, re.S)
assert len(blocks) >= 5, f"only {len(blocks)} adopter blocks in the README"
for path, body in blocks:
    if path == "Cargo.toml":
        old = 'm2m-gateway = { version = "0.1",'
        assert old in body, "the Cargo.toml block names m2m-gateway by version"
        body = body.replace(old, f'm2m-gateway = {{ path = "{repo}",')
        body += "\n[workspace]\n"
    f = dest / path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(body + "\n")
    print("adopter:", path)
PY
# The same versions as this checkout where they overlap, and its compiled
# dependencies reused.
cp Cargo.lock "$dir/"
[ "${1:-}" = "--write" ] && exit 0
# What the adopter pays: at most 100 unique crates (name and version) in its
# normal dependencies, its own tonic (default features) included.
crates=$(cargo tree -q --manifest-path "$dir/Cargo.toml" -e normal --prefix none \
  | sed 's/ (\*)//; s/ (proc-macro)//; s/ (\/.*)//' | sort -u | wc -l)
echo "unique crates of the adopter crate: $crates"
if [ "$crates" -gt 100 ]; then
  echo "the README's adopter crate pulls in $crates crates (at most 100)" >&2
  exit 1
fi
# This checkout's target directory: the dependencies the library's own build
# compiled (aws-lc-sys above all) are reused, not built a second time.
CARGO_TARGET_DIR="$repo/target" cargo test --manifest-path "$dir/Cargo.toml" -q
