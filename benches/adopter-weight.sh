#!/usr/bin/env bash
# What the library costs an adopter: the README's adopter crate (a tonic service
# with its .proto, build.rs, and m2m-gateway with `auth`) against the same crate
# without m2m-gateway (plain tonic), each built clean in its own target
# directory; then both again with TLS on tonic's server (tls-aws-lc). Prints
# the unique crates (name and version, normal dependencies) and the clean debug
# build's wall time of each.
#   benches/adopter-weight.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
.ci/adopter.sh --write "$work/with" >/dev/null
# Plain tonic: the same crate without m2m-gateway (its options.proto copied in,
# the policy test left out).
cp -r "$work/with" "$work/plain"
sed -i '/^m2m-gateway = /d' "$work/plain/Cargo.toml"
rm -rf "$work/plain/tests"
mkdir -p "$work/plain/proto/m2m/auth/v1"
cp proto/m2m/auth/v1/options.proto "$work/plain/proto/m2m/auth/v1/"
sed -i 's|let m2m_protos = env::var("DEP_M2M_GATEWAY_PROTO")?;|let m2m_protos = String::from("proto");|' "$work/plain/build.rs"
# The same two with TLS on the service's own port (tonic's rustls on aws-lc-rs,
# as a production service serves): the crypto backend is then paid by both.
for crate in plain with; do
  cp -r "$work/$crate" "$work/$crate-tls"
  sed -i 's/^tonic = "0.14"$/tonic = { version = "0.14", features = ["tls-aws-lc"] }/' "$work/$crate-tls/Cargo.toml"
  grep -q 'tls-aws-lc' "$work/$crate-tls/Cargo.toml"
done
for crate in plain with plain-tls with-tls; do
  cargo fetch -q --manifest-path "$work/$crate/Cargo.toml"
  crates=$(cargo tree -q --manifest-path "$work/$crate/Cargo.toml" -e normal --prefix none \
    | sed 's/ (\*)//; s/ (proc-macro)//; s/ (\/.*)//' | sort -u | wc -l)
  start=$(date +%s.%N)
  CARGO_TARGET_DIR="$work/target-$crate" cargo build -q --manifest-path "$work/$crate/Cargo.toml"
  end=$(date +%s.%N)
  printf '%-9s %4d unique crates, clean debug build %.1f s\n' "$crate" "$crates" "$(python3 -c "print($end - $start)")"
done
