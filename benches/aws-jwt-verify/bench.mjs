// Verifies one Cognito-shaped token (minted by `cargo run --release --example mint_token`)
// with aws-jwt-verify's CognitoJwtVerifier.verifySync, JWKS pre-loaded, and prints
// the median time per verification over several rounds.
// usage: node bench.mjs TOKEN_FILE [seconds]
import { readFileSync } from 'node:fs';
import { CognitoJwtVerifier } from 'aws-jwt-verify';

const input = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const seconds = Number(process.argv[3] ?? 5);
const verifier = CognitoJwtVerifier.create({
  userPoolId: input.user_pool_id,
  tokenUse: 'access',
  clientId: input.client_id,
  scope: 'orders/read',
});
verifier.cacheJwks(input.jwks);
verifier.verifySync(input.token); // throws if the token is not accepted

const rounds = [];
const end = Date.now() + seconds * 1000;
while (Date.now() < end) {
  const n = 2000;
  const start = process.hrtime.bigint();
  for (let i = 0; i < n; i++) verifier.verifySync(input.token);
  rounds.push(Number(process.hrtime.bigint() - start) / n / 1000);
}
rounds.sort((a, b) => a - b);
const median = rounds[Math.floor(rounds.length / 2)];
console.log(JSON.stringify({ verifier: 'aws-jwt-verify', version: '5.2.1', node: process.version, median_us: Number(median.toFixed(2)), ops_per_sec: Math.round(1e6 / median), rounds: rounds.length }));
