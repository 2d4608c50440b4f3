#!/usr/bin/env bash
# Side-by-side: the same Cognito-shaped token verified by this crate's CognitoValidator
# (first-seen path) and by AWS's Node verifier aws-jwt-verify (verifySync, JWKS
# cached), each on one core, timed the same way (median of rounds of 2,000).
# Installs aws-jwt-verify from the npm registry into benches/aws-jwt-verify/.
set -euo pipefail
cd "$(dirname "$0")/.."
npm ci --prefix benches/aws-jwt-verify --no-audit --no-fund --loglevel=error
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
cargo build --release --example mint_token -q
taskset -c 0 target/release/examples/mint_token > "$tmp"
taskset -c 0 node benches/aws-jwt-verify/bench.mjs "$tmp" 5
