// JWT-claim identification on the wire (method = "jwt_claim"): the client sends a JWT as its password;
// HS256, RS256 and a JWKS file each log in and see their own tenant's rows; bad tokens are refused.
// Also: issuer, nbf, clock skew, the algorithms allow-list and algorithm confusion, allowed_roles, claims
// that are not tenant names, psql with a token as PGPASSWORD, errors that never show key material, config
// errors that name the key, and a reload that rotates the secret.
import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { exportJWK, SignJWT } from 'jose';
import pg from 'pg';
import { ConfigError } from '../src/config/load.js';
import type { ProxyServer } from '../src/server.js';
import { runPsql } from './helpers/pg.js';
import { loadTestConfig, loginFails, startFromFile, startProxy, writeConfigFile, type TestProxy } from './helpers/proxy.js';

const tmp = mkdtempSync(join(tmpdir(), 'helios-jwt-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
const SECRET = 'a-test-secret-that-is-long-enough-for-hs256!';
const userlist = join(tmp, 'userlist.txt');
writeFileSync(userlist, '"appuser" "apppass"\n');

/** method = "jwt_claim" with `jwt` as the [multi_tenancy.identification.jwt] body; appuser may log in with a token. */
function jwtToml(jwt: string, allowedRoles: string | null = '["appuser"]'): (text: string) => string {
  return (text) =>
    text.replace(/method\s*=\s*"username_prefix"/, 'method = "jwt_claim"') +
    `\n[auth]\nauth_file = ${JSON.stringify(userlist)}\n\n[multi_tenancy.identification.jwt]\n${jwt}\n` +
    (allowedRoles !== null ? `allowed_roles = ${allowedRoles}\n` : '');
}

async function hs256(claims: Record<string, unknown>, secret = SECRET): Promise<string> {
  return new SignJWT(claims).setProtectedHeader({ alg: 'HS256' }).setIssuedAt().setExpirationTime('5m').sign(new TextEncoder().encode(secret));
}

/** The tenant's own rows: the scenario names every customer after its tenant, so a leak shows. */
async function assertOwnRows(c: pg.Client, tenant: string): Promise<void> {
  const rows = (await c.query<{ customer: string }>('SELECT customer FROM orders ORDER BY id')).rows;
  assert.ok(rows.length > 0, 'the tenant has orders');
  for (const r of rows) assert.ok(r.customer.startsWith(`${tenant}-`), `${r.customer} is not ${tenant}'s`);
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
      await assertOwnRows(c, 'acme');
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
      await assertOwnRows(c, 'widgetco');
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
      await assertOwnRows(c, 'acme');
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

const now = (): number => Math.floor(Date.now() / 1000);

/** An HS256 token with exactly the claims given (no defaults), signed with `secret`. */
function signed(claims: Record<string, unknown>, secret: string | Uint8Array = SECRET, alg = 'HS256'): Promise<string> {
  return new SignJWT(claims).setProtectedHeader({ alg }).sign(typeof secret === 'string' ? new TextEncoder().encode(secret) : secret);
}

/** The problems config load reports for `jwt` (the [multi_tenancy.identification.jwt] body), or [] when it loads. */
function configProblems(toml: (text: string) => string): string[] {
  try {
    loadTestConfig({ toml });
  } catch (err) {
    if (err instanceof ConfigError) return err.problems;
    throw err;
  }
  return [];
}

describe('jwt_claim: issuer, nbf, clock skew and the tenant claim', () => {
  let p: TestProxy;
  const messages: string[] = [];
  const refused = async (token: string, user = 'appuser', database?: string): Promise<{ code: string | undefined; message: string }> => {
    const f = await loginFails(p.clientConfig(user, database, token));
    messages.push(f.message, f.detail ?? '');
    return f;
  };
  before(async () => {
    p = await startProxy({ toml: jwtToml(`secret = ${JSON.stringify(SECRET)}\nissuer = "https://issuer.test"\nclock_skew_secs = 60`) });
  });
  after(() => p.close());

  it('a wrong or missing issuer is refused with 28P01 naming the issuer', async () => {
    let f = await refused(await signed({ tenant_id: 'acme', iss: 'https://evil.test', exp: now() + 300 }));
    assert.equal(f.code, '28P01');
    assert.match(f.message, /issuer/);
    f = await refused(await signed({ tenant_id: 'acme', exp: now() + 300 }));
    assert.equal(f.code, '28P01');
    assert.match(f.message, /issuer/);
  });

  it('a token without exp is refused (28P01): it could never be revoked', async () => {
    const f = await refused(await signed({ tenant_id: 'acme', iss: 'https://issuer.test' }));
    assert.equal(f.code, '28P01');
    assert.match(f.message, /exp/);
  });

  it('nbf in the future is refused; clock_skew_secs tolerates a just-expired token but not an old one', async () => {
    const f = await refused(await signed({ tenant_id: 'acme', iss: 'https://issuer.test', nbf: now() + 600, exp: now() + 900 }));
    assert.equal(f.code, '28P01');
    assert.match(f.message, /not valid yet/);
    const c = await p.connect('appuser', undefined, await signed({ tenant_id: 'acme', iss: 'https://issuer.test', exp: now() - 20 }));
    assert.equal((await c.query<{ s: string }>('SELECT current_schema() AS s')).rows[0]!.s, 'acme');
    await c.end();
    // nbf just ahead of the clock is inside the skew too.
    const d = await p.connect('appuser', undefined, await signed({ tenant_id: 'acme', iss: 'https://issuer.test', nbf: now() + 20, exp: now() + 300 }));
    await d.end();
    const old = await refused(await signed({ tenant_id: 'acme', iss: 'https://issuer.test', exp: now() - 120 }));
    assert.equal(old.code, '28P01');
    assert.match(old.message, /expired/);
  });

  it('a claim that is not a non-empty string names no tenant (28000); an unknown tenant is 28000', async () => {
    for (const value of [42, ['acme'], { id: 'acme' }, '', true, null]) {
      const f = await refused(await signed({ tenant_id: value, iss: 'https://issuer.test', exp: now() + 300 }));
      assert.equal(f.code, '28000', `claim ${JSON.stringify(value)}`);
      assert.match(f.message, /"tenant_id" claim/);
    }
    const f = await refused(await signed({ tenant_id: 'ACME', iss: 'https://issuer.test', exp: now() + 300 }));
    assert.equal(f.code, '28000');
    assert.match(f.message, /unknown tenant "ACME"/);
  });

  it("a token's tenant cannot be walked around with another tenant's database (42501)", async () => {
    const f = await refused(await signed({ tenant_id: 'acme', iss: 'https://issuer.test', exp: now() + 300 }), 'appuser', 'widgetco_db');
    assert.equal(f.code, '42501');
    assert.match(f.message, /permission denied for database "widgetco_db"/);
  });

  it('psql logs in with a JWT as PGPASSWORD', async () => {
    const token = await signed({ tenant_id: 'acme', iss: 'https://issuer.test', exp: now() + 300 });
    const ok = await runPsql(['-At', '-w', '-c', 'SELECT current_schema()', `host=127.0.0.1 port=${p.port} user=appuser dbname=shared_db`], { PGPASSWORD: token });
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stdout.trim(), 'acme');
    const widget = await runPsql(['-At', '-w', '-c', 'SELECT current_database()', `host=127.0.0.1 port=${p.port} user=appuser`], {
      PGPASSWORD: await signed({ tenant_id: 'widgetco', iss: 'https://issuer.test', exp: now() + 300 }),
    });
    assert.equal(widget.code, 0, widget.stderr);
    assert.equal(widget.stdout.trim(), 'widgetco_db');
    const bad = await runPsql(['-At', '-w', '-c', 'SELECT 1', `host=127.0.0.1 port=${p.port} user=appuser dbname=shared_db`], { PGPASSWORD: `${token}x` });
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /token authentication failed for user "appuser": token signature is invalid/);
    messages.push(bad.stderr);
  });

  it('no refusal shows key material', async () => {
    messages.push((await refused(await signed({ tenant_id: 'acme', iss: 'https://issuer.test', exp: now() + 300 }, 'a-different-secret-that-is-also-long-enough'))).message);
    messages.push((await refused('not.a.jwt')).message);
    const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
    messages.push((await refused(await new SignJWT({ tenant_id: 'acme', iss: 'https://issuer.test' }).setProtectedHeader({ alg: 'RS256' }).setExpirationTime('5m').sign(rsa.privateKey))).message);
    assert.ok(messages.length >= 3);
    for (const m of messages) {
      for (let i = 0; i + 8 <= SECRET.length; i += 4) assert.ok(!m.includes(SECRET.slice(i, i + 8)), `message shows part of the secret: ${m}`);
    }
  });
});

describe('jwt_claim: the algorithms allow-list and algorithm confusion', () => {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const pem = rsa.publicKey.export({ type: 'spki', format: 'pem' }).toString();
  const pemFile = join(tmp, 'confusion.pem');
  writeFileSync(pemFile, pem);

  it('algorithms = ["HS384"] refuses an HS256 token signed with the right secret and accepts HS384', async () => {
    const p = await startProxy({ toml: jwtToml(`secret = ${JSON.stringify(SECRET)}\nalgorithms = ["HS384"]`) });
    try {
      const f = await loginFails(p.clientConfig('appuser', undefined, await signed({ tenant_id: 'acme', exp: now() + 300 })));
      assert.equal(f.code, '28P01');
      assert.match(f.message, /algorithm is not allowed/);
      const c = await p.connect('appuser', undefined, await signed({ tenant_id: 'acme', exp: now() + 300 }, SECRET, 'HS384'));
      await c.end();
    } finally {
      await p.close();
    }
  });

  it('an HS256 token whose HMAC secret is the RSA public key PEM is refused (public_key_file)', async () => {
    const p = await startProxy({ toml: jwtToml(`public_key_file = ${JSON.stringify(pemFile)}`) });
    try {
      for (const secret of [pem, pem.trim(), rsa.publicKey.export({ type: 'spki', format: 'der' })]) {
        const token = await signed({ tenant_id: 'acme', exp: now() + 300 }, typeof secret === 'string' ? secret : new Uint8Array(secret));
        const f = await loginFails(p.clientConfig('appuser', undefined, token));
        assert.equal(f.code, '28P01');
        assert.match(f.message, /algorithm is not allowed/);
        assert.ok(!f.message.includes('BEGIN') && !f.message.includes(pem.split('\n')[1]!.slice(0, 16)), f.message);
      }
      // The RSA key still works for RS256.
      const c = await p.connect('appuser', undefined, await new SignJWT({ tenant_id: 'acme' }).setProtectedHeader({ alg: 'RS256' }).setExpirationTime('5m').sign(rsa.privateKey));
      await c.end();
    } finally {
      await p.close();
    }
  });

  it('a symmetric key in a JWKS file is never used: an HS256 token naming it by kid is refused', async () => {
    const k = Buffer.from(SECRET).toString('base64url');
    const jwksFile = join(tmp, 'oct-jwks.json');
    writeFileSync(jwksFile, JSON.stringify({ keys: [{ kty: 'oct', k, kid: 'sym', alg: 'HS256' }, { ...(await exportJWK(rsa.publicKey)), kid: 'r1', alg: 'RS256' }] }));
    const p = await startProxy({ toml: jwtToml(`jwks_file = ${JSON.stringify(jwksFile)}`) });
    try {
      const token = await new SignJWT({ tenant_id: 'acme' }).setProtectedHeader({ alg: 'HS256', kid: 'sym' }).setExpirationTime('5m').sign(new TextEncoder().encode(SECRET));
      const f = await loginFails(p.clientConfig('appuser', undefined, token));
      assert.equal(f.code, '28P01');
      assert.ok(!f.message.includes(k.slice(0, 12)), f.message);
    } finally {
      await p.close();
    }
  });
});

describe('jwt_claim: which backend roles a token may log in as (allowed_roles)', () => {
  // heliosauth is the seeded superuser, with its password in auth_file: a token must never reach it unlisted.
  const list = join(tmp, 'roles-userlist.txt');
  writeFileSync(list, '"appuser" "apppass"\n"heliosauth" "heliosauth"\n');
  const rolesToml = (jwt: string, auth = ''): ((text: string) => string) => (text) =>
    text.replace(/method\s*=\s*"username_prefix"/, 'method = "jwt_claim"') +
    `\n[auth]\nauth_file = ${JSON.stringify(list)}\n${auth}\n\n[multi_tenancy.identification.jwt]\nsecret = ${JSON.stringify(SECRET)}\n${jwt}\n`;

  it('a role not listed is refused (28000), whether or not auth_file has its password; a listed role without one too', async () => {
    const p = await startProxy({ toml: rolesToml('allowed_roles = ["appuser", "nosecret"]', 'auth_user = "heliosauth"') });
    try {
      const token = await signed({ tenant_id: 'acme', exp: now() + 300 });
      for (const role of ['heliosauth', 'postgres', 'acme.appuser']) {
        const f = await loginFails(p.clientConfig(role, undefined, token));
        assert.equal(f.code, '28000', role);
        assert.match(f.message, new RegExp(`role "${role.replace('.', '\\.')}" may not log in with a token`));
      }
      const f = await loginFails(p.clientConfig('nosecret', undefined, token));
      assert.equal(f.code, '28000');
      assert.match(f.message, /no usable backend password for role "nosecret"/);
      const c = await p.connect('appuser', undefined, token);
      assert.equal((await c.query<{ u: string }>('SELECT current_user AS u')).rows[0]!.u, 'appuser');
      await c.end();
    } finally {
      await p.close();
    }
  });

  it('config: allowed_roles is required with jwt_claim and may not name auth_user', () => {
    let problems = configProblems(rolesToml(''));
    assert.ok(problems.some((m) => m.startsWith('multi_tenancy.identification.jwt.allowed_roles: required')), JSON.stringify(problems));
    problems = configProblems(rolesToml('allowed_roles = ["appuser", "heliosauth"]', 'auth_user = "heliosauth"'));
    assert.ok(problems.some((m) => m.startsWith('multi_tenancy.identification.jwt.allowed_roles: "heliosauth" is auth.auth_user')), JSON.stringify(problems));
    assert.deepEqual(configProblems(rolesToml('allowed_roles = ["appuser", "heliosauth"]')), []);
  });
});

describe('jwt config errors at load name the key', () => {
  const pemFile = join(tmp, 'load.pem');
  writeFileSync(pemFile, generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey.export({ type: 'spki', format: 'pem' }));

  it('two key sources, none, an unreadable key file, a JWKS without keys, algorithms the key cannot verify, a short secret', () => {
    const cases: [string, RegExp][] = [
      [`secret = ${JSON.stringify(SECRET)}\npublic_key_file = ${JSON.stringify(pemFile)}`, /^multi_tenancy\.identification\.jwt: set exactly one of secret, public_key_file or jwks_file$/],
      [`public_key_file = ${JSON.stringify(pemFile)}\njwks_file = ${JSON.stringify(pemFile)}`, /^multi_tenancy\.identification\.jwt: set exactly one/],
      ['claim = "tenant_id"', /^multi_tenancy\.identification\.jwt: set exactly one/],
      [`public_key_file = ${JSON.stringify(join(tmp, 'missing.pem'))}`, /^multi_tenancy\.identification\.jwt\.public_key_file: cannot read .*missing\.pem/],
      [`public_key_file = ${JSON.stringify(userlist)}`, /^multi_tenancy\.identification\.jwt\.public_key_file: cannot read a PEM/],
      [`jwks_file = ${JSON.stringify(join(tmp, 'missing.json'))}`, /^multi_tenancy\.identification\.jwt\.jwks_file: cannot read .*missing\.json/],
      [`jwks_file = ${JSON.stringify(pemFile)}`, /^multi_tenancy\.identification\.jwt\.jwks_file: .*load\.pem/],
      [`secret = ${JSON.stringify(SECRET)}\nalgorithms = ["RS256", "HS256"]`, /^multi_tenancy\.identification\.jwt\.algorithms: RS256 cannot be verified with the configured secret$/],
      [`public_key_file = ${JSON.stringify(pemFile)}\nalgorithms = ["HS256"]`, /^multi_tenancy\.identification\.jwt\.algorithms: HS256 cannot be verified with the configured key$/],
      [`public_key_file = ${JSON.stringify(pemFile)}\nalgorithms = ["ES256"]`, /^multi_tenancy\.identification\.jwt\.algorithms: ES256/],
      [`secret = ${JSON.stringify(SECRET)}\nalgorithms = ["none"]`, /^multi_tenancy\.identification\.jwt\.algorithms/],
      ['secret = "short-secret-value"', /^multi_tenancy\.identification\.jwt\.secret: use at least 32 characters/],
    ];
    for (const [body, want] of cases) {
      const problems = configProblems(jwtToml(body));
      assert.ok(problems.some((m) => want.test(m)), `${body}\n→ ${JSON.stringify(problems)}`);
      assert.ok(!problems.some((m) => m.includes(SECRET) || m.includes('short-secret-value') || m.includes('BEGIN PUBLIC KEY')), JSON.stringify(problems));
    }
    assert.deepEqual(configProblems(jwtToml(`secret = ${JSON.stringify(SECRET)}\nalgorithms = ["HS256", "HS512"]`)), []);
    // jwt_claim needs the key and [auth] auth_file for the backend passwords.
    const bare = configProblems((t) => t.replace(/method\s*=\s*"username_prefix"/, 'method = "jwt_claim"'));
    assert.ok(bare.some((m) => m.startsWith('multi_tenancy.identification.jwt: required')), JSON.stringify(bare));
    assert.ok(bare.some((m) => m.startsWith('multi_tenancy.identification.method: "jwt_claim" needs auth.auth_file')), JSON.stringify(bare));
  });

  it('a malformed JWKS file: the error names the key and quotes none of the file', () => {
    const jwksFile = join(tmp, 'malformed-jwks.json');
    writeFileSync(jwksFile, `{"keys": [{"kty": "oct", "kid": "a", "k": 'c2VjcmV0LWtleS1tYXRlcmlhbA'}]}`);
    const problems = configProblems(jwtToml(`jwks_file = ${JSON.stringify(jwksFile)}`));
    assert.ok(problems.some((m) => m.startsWith('multi_tenancy.identification.jwt.jwks_file: ') && m.includes('malformed-jwks.json')), JSON.stringify(problems));
    assert.ok(!problems.some((m) => m.includes('c2VjcmV0')), `key material in the error: ${JSON.stringify(problems)}`);
  });
});

describe('jwt_claim: reload rotates the secret', () => {
  const path = join(tmp, 'jwt-reload.toml');
  const NEW_SECRET = 'the-rotated-secret-also-long-enough-for-hs256';
  let proxy: ProxyServer;
  const cfg = (password: string) => ({ host: '127.0.0.1', port: proxy.port, user: 'appuser', password });
  before(async () => {
    writeConfigFile(path, jwtToml(`secret = ${JSON.stringify(SECRET)}`));
    proxy = await startFromFile(path);
  });
  after(() => proxy.close());

  it('after a reload the new secret logs in and the old one is refused; an invalid file changes nothing', async () => {
    const login = async (token: string): Promise<void> => {
      const c = new pg.Client(cfg(token));
      await c.connect();
      await c.end();
    };
    const oldToken = await signed({ tenant_id: 'acme', exp: now() + 300 });
    const newToken = await signed({ tenant_id: 'acme', exp: now() + 300 }, NEW_SECRET);
    await login(oldToken);
    assert.equal((await loginFails(cfg(newToken))).code, '28P01');

    writeConfigFile(path, jwtToml(`secret = ${JSON.stringify(NEW_SECRET)}`));
    const r = proxy.reload();
    assert.equal(r.ok, true, JSON.stringify(r));
    await login(newToken);
    const f = await loginFails(cfg(oldToken));
    assert.equal(f.code, '28P01');
    assert.match(f.message, /signature/);

    writeConfigFile(path, jwtToml(`secret = ${JSON.stringify(SECRET)}\nalgorithms = ["RS256"]`));
    const bad = proxy.reload();
    assert.equal(bad.ok, false);
    assert.ok(!bad.ok && bad.problems.some((m) => m.startsWith('multi_tenancy.identification.jwt.algorithms')), JSON.stringify(bad));
    await login(newToken);
    assert.equal((await loginFails(cfg(oldToken))).code, '28P01');
  });
});
