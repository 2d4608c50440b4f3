// Starts oauth2-mock-server (a third-party OAuth 2.0 server) on a free loopback
// port and shapes its client_credentials tokens like Cognito's: client_id, sub,
// token_use, version, jti, auth_time. Prints {"issuer", "port"} as one JSON line
// once listening; stops on SIGTERM or when stdin closes.
import { randomUUID } from 'node:crypto';
import { OAuth2Server } from 'oauth2-mock-server';

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');

server.service.on('beforeTokenSigning', (token, req) => {
  let clientId = req.body?.client_id;
  const auth = req.headers.authorization ?? '';
  if (auth.toLowerCase().startsWith('basic ')) {
    clientId = Buffer.from(auth.slice(6), 'base64').toString('utf8').split(':')[0];
  }
  Object.assign(token.payload, {
    client_id: clientId,
    sub: clientId,
    token_use: 'access',
    version: 2,
    jti: randomUUID(),
    auth_time: token.payload.iat,
  });
});

await server.start(0, '127.0.0.1');
console.log(JSON.stringify({ issuer: server.issuer.url, port: server.address().port }));

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  await server.stop();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop);
process.stdin.resume();
