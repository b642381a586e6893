// JWT-claim identification on the wire (method = "jwt_claim"): the client sends a JWT as its password;
// HS256, RS256 and a JWKS file each log in and see their own tenant's rows; bad tokens are refused.
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { exportJWK, SignJWT } from 'jose';
import { loginFails, startProxy, type TestProxy } from './helpers/proxy.js';

const tmp = mkdtempSync(join(tmpdir(), 'helios-jwt-'));
const SECRET = 'a-test-secret-that-is-long-enough-for-hs256!';
const userlist = join(tmp, 'userlist.txt');
writeFileSync(userlist, '"appuser" "apppass"\n');

function jwtToml(jwt: string): (text: string) => string {
  return (text) =>
    text.replace(/method\s*=\s*"username_prefix"/, 'method = "jwt_claim"') +
    `\n[auth]\nauth_file = ${JSON.stringify(userlist)}\n\n[multi_tenancy.identification.jwt]\n${jwt}\n`;
}

async function hs256(claims: Record<string, unknown>, secret = SECRET): Promise<string> {
  return new SignJWT(claims).setProtectedHeader({ alg: 'HS256' }).setIssuedAt().setExpirationTime('5m').sign(new TextEncoder().encode(secret));
}

describe('jwt_claim with an HS256 secret', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ toml: jwtToml(`secret = ${JSON.stringify(SECRET)}\naudience = "helios"`) });
  });
  after(() => p.close());

  it('logs in and reads the tenant from the claim', async () => {
    const c = await p.connect('appuser', undefined, await hs256({ tenant_id: 'acme', aud: 'helios' }));
    try {
      const r = await c.query<{ s: string }>('SELECT current_schema() AS s');
      assert.equal(r.rows[0]!.s, 'acme');
    } finally {
      await c.end();
    }
  });

  it('refuses a wrong audience, a tampered token, an expired token and alg none', async () => {
    let f = await loginFails(p.clientConfig('appuser', undefined, await hs256({ tenant_id: 'acme', aud: 'other' })));
    assert.equal(f.code, '28P01');
    assert.match(f.message, /audience/);
    const good = await hs256({ tenant_id: 'acme', aud: 'helios' });
    const [h, , s] = good.split('.');
    const forged = `${h}.${Buffer.from(JSON.stringify({ tenant_id: 'widgetco', aud: 'helios', exp: 9999999999 })).toString('base64url')}.${s}`;
    f = await loginFails(p.clientConfig('appuser', undefined, forged));
    assert.equal(f.code, '28P01');
    assert.match(f.message, /signature/);
    const expired = await new SignJWT({ tenant_id: 'acme', aud: 'helios' }).setProtectedHeader({ alg: 'HS256' }).setExpirationTime(Math.floor(Date.now() / 1000) - 3600).sign(new TextEncoder().encode(SECRET));
    f = await loginFails(p.clientConfig('appuser', undefined, expired));
    assert.match(f.message, /expired/);
    const none = `${Buffer.from('{"alg":"none","typ":"JWT"}').toString('base64url')}.${Buffer.from(JSON.stringify({ tenant_id: 'acme', aud: 'helios' })).toString('base64url')}.`;
    f = await loginFails(p.clientConfig('appuser', undefined, none));
    assert.equal(f.code, '28P01');
    f = await loginFails(p.clientConfig('appuser', undefined, await hs256({ aud: 'helios' })));
    assert.equal(f.code, '28000');
    assert.match(f.message, /tenant_id/);
    f = await loginFails(p.clientConfig('appuser', undefined, await hs256({ tenant_id: 'nosuch', aud: 'helios' })));
    assert.equal(f.code, '28000');
    assert.match(f.message, /unknown tenant "nosuch"/);
  });
});

describe('jwt_claim with RS256 public key and JWKS', () => {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const pemFile = join(tmp, 'rs256.pem');
  writeFileSync(pemFile, rsa.publicKey.export({ type: 'spki', format: 'pem' }));
  it('RS256 with public_key_file', async () => {
    const p = await startProxy({ toml: jwtToml(`public_key_file = ${JSON.stringify(pemFile)}`) });
    try {
      const token = await new SignJWT({ tenant_id: 'widgetco' }).setProtectedHeader({ alg: 'RS256' }).setExpirationTime('5m').sign(rsa.privateKey);
      const c = await p.connect('appuser', undefined, token);
      const r = await c.query<{ d: string }>('SELECT current_database() AS d');
      assert.equal(r.rows[0]!.d, 'widgetco_db');
      await c.end();
    } finally {
      await p.close();
    }
  });
  it('ES256 from a JWKS file, picked by kid', async () => {
    const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    const jwk = { ...(await exportJWK(ec.publicKey)), kid: 'k2', alg: 'ES256', use: 'sig' };
    const other = { ...(await exportJWK(rsa.publicKey)), kid: 'k1', alg: 'RS256', use: 'sig' };
    const jwksFile = join(tmp, 'jwks.json');
    writeFileSync(jwksFile, JSON.stringify({ keys: [other, jwk] }));
    const p = await startProxy({ toml: jwtToml(`jwks_file = ${JSON.stringify(jwksFile)}`) });
    try {
      const token = await new SignJWT({ tenant_id: 'acme' }).setProtectedHeader({ alg: 'ES256', kid: 'k2' }).setExpirationTime('5m').sign(ec.privateKey);
      const c = await p.connect('appuser', undefined, token);
      const r = await c.query<{ s: string }>('SELECT current_schema() AS s');
      assert.equal(r.rows[0]!.s, 'acme');
      await c.end();
      const f = await loginFails(p.clientConfig('appuser', undefined, await new SignJWT({ tenant_id: 'acme' }).setProtectedHeader({ alg: 'ES256', kid: 'nope' }).setExpirationTime('5m').sign(ec.privateKey)));
      assert.equal(f.code, '28P01');
    } finally {
      await p.close();
    }
  });
});
