// The HTTP SQL endpoint ([http_gateway]): POST /v1/query and /v1/transaction, identified by an API key
// plus the tenant header, or by a JWT; each request meets the tenant's isolation, permissions and limits.
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { SignJWT } from 'jose';
import { direct, startProxy, type TestProxy } from './helpers/proxy.js';

const tmp = mkdtempSync(join(tmpdir(), 'helios-http-'));
const userlist = join(tmp, 'userlist.txt');
writeFileSync(userlist, '"appuser" "apppass"\n');
const ACME_KEY = 'acme-key-0123456789abcdef';
const WIDGET_KEY = 'widget-key-0123456789abcdef';
const SECRET = 'a-test-secret-that-is-long-enough-for-hs256!';

function gatewayToml(extra = ''): (text: string) => string {
  return (text) =>
    `${text}\n[auth]\nauth_file = ${JSON.stringify(userlist)}\n\n[multi_tenancy.identification.jwt]\nsecret = ${JSON.stringify(SECRET)}\n\n` +
    `[http_gateway]\nlisten_address = "127.0.0.1:0"\nrole = "appuser"\n${extra}\n` +
    `[[http_gateway.api_keys]]\nkey = "${ACME_KEY}"\ntenants = ["acme"]\n\n[[http_gateway.api_keys]]\nkey = "${WIDGET_KEY}"\ntenants = ["widgetco"]\n`;
}

interface Reply {
  status: number;
  headers: Headers;
  body: { error?: { message: string; code: string; query?: string }; rows?: unknown[]; fields?: { name: string; dataTypeID: number }[]; command?: string; rowCount?: number | null; results?: { rows: unknown[] }[] };
}

async function post(p: TestProxy, path: string, body: unknown, headers: Record<string, string>): Promise<Reply> {
  const res = await fetch(`http://127.0.0.1:${p.gatewayPort}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });
  return { status: res.status, headers: res.headers, body: (await res.json()) as Reply['body'] };
}

describe('HTTP gateway, identify_by = "header"', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ toml: gatewayToml(), gateway: true });
  });
  after(() => p.close());
  const acme = { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'acme' };

  it('header + key: runs in the tenant schema with bound parameters', async () => {
    const r = await post(p, '/v1/query', { query: 'SELECT current_schema() AS s, $1::int + 1 AS n', params: [41] }, acme);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body.rows, [{ s: 'acme', n: '42' }]);
    assert.equal(r.body.command, 'SELECT');
    assert.equal(r.body.rowCount, 1);
    assert.deepEqual(r.body.fields!.map((f) => f.name), ['s', 'n']);
  });

  it('header without key: 401; key for another tenant: 403', async () => {
    let r = await post(p, '/v1/query', { query: 'SELECT 1' }, { 'x-tenant-id': 'acme' });
    assert.equal(r.status, 401);
    r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${WIDGET_KEY}`, 'x-tenant-id': 'acme' });
    assert.equal(r.status, 403);
    assert.equal(r.body.error!.code, '42501');
  });

  it('a blocked statement is 403 and never reaches the database', async () => {
    await direct('CREATE TABLE IF NOT EXISTS acme.http_keep (v int); INSERT INTO acme.http_keep VALUES (1); GRANT ALL ON acme.http_keep TO appuser', 'shared_db');
    const t = await post(p, '/v1/query', { query: 'TRUNCATE http_keep' }, acme);
    assert.equal(t.status, 403, JSON.stringify(t.body));
    assert.equal(t.body.error!.code, '42501');
    const rows = await direct<{ n: string }>('SELECT count(*) AS n FROM acme.http_keep', 'shared_db');
    assert.equal(rows[0]!.n, '1');
    const x = await post(p, '/v1/query', { query: 'SELECT * FROM newclient.anything' }, acme);
    assert.equal(x.status, 403, JSON.stringify(x.body));
  });

  it('/v1/transaction rolls back when its last statement fails', async () => {
    await direct('CREATE TABLE IF NOT EXISTS acme.http_tx (v int)', 'shared_db');
    await direct('GRANT ALL ON acme.http_tx TO appuser', 'shared_db');
    const r = await post(p, '/v1/transaction', { queries: [{ query: 'INSERT INTO http_tx VALUES ($1)', params: [1] }, { query: 'SELECT 1/0' }] }, acme);
    assert.equal(r.status, 400);
    assert.equal(r.body.error!.code, '22012');
    const rows = await direct<{ n: string }>('SELECT count(*) AS n FROM acme.http_tx', 'shared_db');
    assert.equal(rows[0]!.n, '0');
    const ok = await post(p, '/v1/transaction', { queries: [{ query: 'INSERT INTO http_tx VALUES ($1)', params: [2] }, { query: 'SELECT count(*) AS n FROM http_tx' }] }, acme);
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.deepEqual(ok.body.results![1]!.rows, [{ n: '1' }]);
  });
});

describe('HTTP gateway, identify_by = "jwt_claim"', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ toml: gatewayToml('identify_by = "jwt_claim"'), gateway: true });
  });
  after(() => p.close());
  it('a JWT names the tenant', async () => {
    const token = await new SignJWT({ tenant_id: 'widgetco' }).setProtectedHeader({ alg: 'HS256' }).setExpirationTime('5m').sign(new TextEncoder().encode(SECRET));
    const r = await post(p, '/v1/query', { query: 'SELECT current_database() AS d', arrayMode: true }, { authorization: `Bearer ${token}` });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body.rows, [['widgetco_db']]);
    const bad = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${token}x` });
    assert.equal(bad.status, 401);
  });
});
