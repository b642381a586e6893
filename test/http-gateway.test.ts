// The HTTP SQL endpoint ([http_gateway]): POST /v1/query and /v1/transaction, identified by an API key
// plus the tenant header, or by a JWT; each request meets the tenant's isolation, permissions and limits.
// Also: body limits (413), the token bucket (429), max_query_duration and request_timeout_secs (504),
// parameters of every JSON type, arrayMode, request errors (400/404/405), transactions that commit all or
// nothing, metrics, a client that hangs up, sessions that never leak, and HTTPS for the gateway and admin API.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpRequest, type IncomingHttpHeaders } from 'node:http';
import { connect as netConnect, type Socket } from 'node:net';
import { request as httpsRequest } from 'node:https';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { SignJWT } from 'jose';
import pg from 'pg';
import { bindText, copyFail, describePortal, execute, parse, startupMessage, SYNC } from '../src/protocol/messages.js';
import { ProxyServer, silentLogger } from '../src/server.js';
import { testCerts, type TestCerts } from './helpers/certs.js';
import { direct, eventually, loadTestConfig, startProxy, type TestProxy } from './helpers/proxy.js';

const tmp = mkdtempSync(join(tmpdir(), 'helios-http-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
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
  body: {
    error?: { message: string; code: string; query?: string; detail?: string };
    rows?: unknown[];
    fields?: { name: string; dataTypeID: number }[];
    command?: string;
    rowCount?: number | null;
    results?: { rows: unknown[]; command: string; rowCount: number | null }[];
  };
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

  it('a JWT for an unknown tenant, without the claim, expired, or unsigned is refused; the tenant header is ignored', async () => {
    const sign = (claims: Record<string, unknown>, exp: string | number = '5m'): Promise<string> =>
      new SignJWT(claims).setProtectedHeader({ alg: 'HS256' }).setExpirationTime(exp).sign(new TextEncoder().encode(SECRET));
    let r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${await sign({ tenant_id: 'nosuch' })}` });
    assert.equal(r.body.error!.code, '28000');
    assert.ok(r.status === 401 || r.status === 403, String(r.status));
    assert.match(r.body.error!.message, /unknown tenant "nosuch"/);
    r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${await sign({ sub: 'x' })}` });
    assert.equal(r.status, 401);
    assert.equal(r.body.error!.code, '28000');
    r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${await sign({ tenant_id: 'acme' }, Math.floor(Date.now() / 1000) - 3600)}` });
    assert.equal(r.status, 401);
    assert.match(r.body.error!.message, /expired/);
    assert.match(r.headers.get('www-authenticate') ?? '', /invalid_token/);
    const none = `${Buffer.from('{"alg":"none"}').toString('base64url')}.${Buffer.from('{"tenant_id":"acme"}').toString('base64url')}.`;
    r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${none}` });
    assert.equal(r.status, 401);
    // identify_by = "jwt_claim": the header cannot move a widgetco token to acme, and an API key is no JWT.
    r = await post(p, '/v1/query', { query: 'SELECT current_database() AS d' }, { authorization: `Bearer ${await sign({ tenant_id: 'widgetco' })}`, 'x-tenant-id': 'acme' });
    assert.deepEqual(r.body.rows, [{ d: 'widgetco_db' }]);
    r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'acme' });
    assert.equal(r.status, 401);
    assert.ok(!JSON.stringify(r.body).includes(SECRET));
  });
});

// ── more helpers ─────────────────────────────────────────────────────────────────────

interface RawReply {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
}

/**
 * One request over node:http (or node:https with `ca`): for what fetch cannot do (a chunked body of our
 * own making, an unparsable body, a CA to trust).
 */
function raw(
  port: number,
  opts: { method?: string; path: string; headers?: Record<string, string>; body?: string | string[]; ca?: Buffer },
): Promise<RawReply> {
  return new Promise((resolve, reject) => {
    const options = { host: '127.0.0.1', port, method: opts.method ?? 'POST', path: opts.path, headers: opts.headers ?? {} };
    const req = opts.ca !== undefined ? httpsRequest({ ...options, ca: opts.ca, servername: 'localhost' }) : httpRequest(options);
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    if (Array.isArray(opts.body)) for (const chunk of opts.body) req.write(chunk);
    req.end(typeof opts.body === 'string' ? opts.body : undefined);
  });
}

async function adminJson<T>(p: TestProxy, path: string): Promise<T> {
  const res = await fetch(`http://127.0.0.1:${p.adminPort}${path}`);
  assert.equal(res.status, 200);
  return (await res.json()) as T;
}

async function count(table: string, database = 'shared_db'): Promise<number> {
  return (await direct<{ n: number }>(`SELECT count(*)::int AS n FROM ${table}`, database))[0]!.n;
}

/** Backends running `marker` right now (the marker is split so this query never matches itself). */
async function running(marker: string): Promise<number> {
  const rows = await direct<{ n: number }>(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%'",
    'postgres',
    [marker],
  );
  return rows[0]!.n;
}

async function noSessionsLeft(p: TestProxy): Promise<void> {
  const ctx = p.proxy.ctx;
  await eventually(
    () => ctx.sessions.size === 0 && ['acme', 'widgetco'].every((id) => ctx.tenants.get(id)!.clients === 0 && ctx.tenants.get(id)!.backendsInUse === 0),
    5000,
    `sessions to end (sessions ${ctx.sessions.size}, acme clients ${ctx.tenants.get('acme')!.clients}, backends ${ctx.tenants.get('acme')!.backendsInUse})`,
  );
}

describe('HTTP gateway: requests and answers', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ toml: gatewayToml('max_body_bytes = 4096\nmax_response_bytes = 65536'), gateway: true, admin: true });
    await direct(
      `CREATE TABLE IF NOT EXISTS acme.http_gw_victim (v int);
       CREATE TABLE IF NOT EXISTS acme.http_gw_multi (v int);
       CREATE TABLE IF NOT EXISTS acme.http_gw_all (v int);
       CREATE TABLE IF NOT EXISTS acme.http_gw_commit (v int);
       CREATE TABLE IF NOT EXISTS acme.http_gw_chain (v int);
       TRUNCATE acme.http_gw_multi, acme.http_gw_all, acme.http_gw_commit, acme.http_gw_chain;
       GRANT ALL ON acme.http_gw_victim, acme.http_gw_multi, acme.http_gw_all, acme.http_gw_commit, acme.http_gw_chain TO appuser`,
      'shared_db',
    );
  });
  after(() => p.close());
  const acme = { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'acme' };

  it('a body over max_body_bytes is 413, whether declared or chunked; one just under runs', async () => {
    const big = { query: 'SELECT $1::text AS v', params: ['x'.repeat(5000)] };
    let r = await post(p, '/v1/query', big, acme);
    assert.equal(r.status, 413);
    assert.equal(r.body.error!.code, '54000');
    assert.match(r.body.error!.message, /max_body_bytes \(4096\)/);
    const text = JSON.stringify(big);
    const chunked = await raw(p.gatewayPort!, { path: '/v1/query', headers: { ...acme, 'content-type': 'application/json' }, body: [text.slice(0, 2000), text.slice(2000, 4000), text.slice(4000)] });
    assert.equal(chunked.status, 413, chunked.text);
    r = await post(p, '/v1/query', { query: 'SELECT length($1::text) AS n', params: ['x'.repeat(3900)] }, acme);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body.rows, [{ n: '3900' }]);
    // Identification comes first: without a key, a big body is 401, not read.
    r = await post(p, '/v1/query', big, { 'x-tenant-id': 'acme' });
    assert.equal(r.status, 401);
  });

  it('params of every JSON type are bound as values; an injection attempt stays a value', async () => {
    await direct('TRUNCATE acme.http_gw_victim; INSERT INTO acme.http_gw_victim VALUES (7)', 'shared_db');
    const r = await post(
      p,
      '/v1/query',
      {
        query:
          "SELECT $1::text IS NULL AS is_null, $2::boolean AS t, $3::boolean AS f, $4::int AS i, $5::numeric AS num, $6::text AS s, $7::jsonb ->> 'k' AS o, $8::jsonb ->> 1 AS a, $9::text AS inj",
        params: [null, true, false, -42, 1.25, 'héllo "dq" \'sq\' \\ $1', { k: 'v' }, [1, 'two'], "1; DROP TABLE http_gw_victim; --"],
      },
      acme,
    );
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body.rows, [{ is_null: 't', t: 't', f: 'f', i: '-42', num: '1.25', s: 'héllo "dq" \'sq\' \\ $1', o: 'v', a: 'two', inj: '1; DROP TABLE http_gw_victim; --' }]);
    const q = await post(p, '/v1/query', { query: 'SELECT count(*) AS n FROM http_gw_victim WHERE v::text = $1', params: ["7' OR '1'='1"] }, acme);
    assert.equal(q.status, 200, JSON.stringify(q.body));
    assert.deepEqual(q.body.rows, [{ n: '0' }]);
    const typed = await post(p, '/v1/query', { query: 'SELECT pg_typeof($1::json)::text AS t, $1::json AS j', params: [{ nested: [1, null, true] }] }, acme);
    assert.deepEqual(typed.body.rows, [{ t: 'json', j: '{"nested":[1,null,true]}' }]);
    assert.equal(await count('acme.http_gw_victim'), 1);
  });

  it('arrayMode returns rows as arrays (duplicate column names and NULLs survive)', async () => {
    const r = await post(p, '/v1/query', { query: "SELECT 1 AS a, NULL::text AS b, 'x' AS a", arrayMode: true }, acme);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body.rows, [['1', null, 'x']]);
    assert.deepEqual(r.body.fields!.map((f) => f.name), ['a', 'b', 'a']);
    assert.deepEqual(r.body.fields!.map((f) => f.dataTypeID), [23, 25, 25]);
    const objects = await post(p, '/v1/query', { query: 'SELECT 1 AS a, NULL::text AS b' }, acme);
    assert.deepEqual(objects.body.rows, [{ a: '1', b: null }]);
    const tx = await post(p, '/v1/transaction', { queries: [{ query: 'SELECT 1 AS a' }, { query: 'SELECT 2 AS a' }], arrayMode: true }, acme);
    assert.equal(tx.status, 200, JSON.stringify(tx.body));
    assert.deepEqual(tx.body.results!.map((x) => x.rows), [[['1']], [['2']]]);
  });

  it('identification: missing tenant header 400, tenant the key does not cover 403, wrong key 401', async () => {
    let r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${ACME_KEY}` });
    assert.equal(r.status, 400);
    assert.equal(r.body.error!.code, '28000');
    assert.match(r.body.error!.message, /X-Tenant-Id/);
    r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'nosuch' });
    assert.equal(r.status, 403);
    assert.equal(r.body.error!.code, '42501');
    r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${ACME_KEY}x`, 'x-tenant-id': 'acme' });
    assert.equal(r.status, 401);
    assert.equal(r.body.error!.code, '28P01');
    assert.match(r.headers.get('www-authenticate') ?? '', /Bearer/);
    r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Basic ${Buffer.from(`x:${ACME_KEY}`).toString('base64')}`, 'x-tenant-id': 'acme' });
    assert.equal(r.status, 401);
    assert.ok(!JSON.stringify(r.body).includes(ACME_KEY));
  });

  it('bad requests: unparsable JSON and wrong shapes 400, unknown path 404, GET 405', async () => {
    const headers = { ...acme, 'content-type': 'application/json' };
    let x = await raw(p.gatewayPort!, { path: '/v1/query', headers, body: '{"query": "SELECT 1",' });
    assert.equal(x.status, 400);
    assert.equal((JSON.parse(x.text) as Reply['body']).error!.code, '08P01');
    for (const body of [{}, { query: '' }, { query: 'SELECT 1', params: 'x' }, { query: 'SELECT 1', extra: 1 }, { query: 42 }, [], { queries: [] }]) {
      const r = await post(p, '/v1/query', body, acme);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.equal(r.body.error!.code, '08P01');
    }
    for (const body of [{ queries: [] }, { query: 'SELECT 1' }, { queries: [{ query: 'SELECT 1', arrayMode: true }] }]) {
      const r = await post(p, '/v1/transaction', body, acme);
      assert.equal(r.status, 400, JSON.stringify(body));
    }
    let r = await post(p, '/v2/query', { query: 'SELECT 1' }, acme);
    assert.equal(r.status, 404);
    x = await raw(p.gatewayPort!, { method: 'GET', path: '/v1/query', headers: acme });
    assert.equal(x.status, 405);
    assert.equal(x.headers.allow, 'POST');
    x = await raw(p.gatewayPort!, { method: 'GET', path: '/', headers: acme });
    assert.equal(x.status, 404);
    // A query string does not change the route.
    r = await post(p, '/v1/query?x=1', { query: 'SELECT 1 AS one' }, acme);
    assert.equal(r.status, 200);
  });

  it('a multi-statement query string is refused and runs nothing', async () => {
    const r = await post(p, '/v1/query', { query: 'INSERT INTO http_gw_multi VALUES (1); INSERT INTO http_gw_multi VALUES (2)' }, acme);
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error!.code, '42601');
    const d = await post(p, '/v1/query', { query: 'SELECT 1; DROP TABLE http_gw_victim' }, acme);
    assert.ok(d.status >= 400 && d.status < 500, JSON.stringify(d.body));
    const t = await post(p, '/v1/transaction', { queries: [{ query: 'INSERT INTO http_gw_multi VALUES (3); INSERT INTO http_gw_multi VALUES (4)' }] }, acme);
    assert.equal(t.status, 400);
    assert.equal(await count('acme.http_gw_multi'), 0);
    assert.equal(await count('acme.http_gw_victim'), 1);
  });

  it('statements that escape the tenant schema are 403 (qualified, quoted, Unicode-escaped, CTE, search_path), in /v1/transaction too', async () => {
    for (const query of [
      'SELECT * FROM newclient.orders',
      'SELECT * FROM "newclient"."orders"',
      'SELECT * FROM U&"\\006eewclient".orders',
      'WITH x AS (SELECT * FROM newclient.orders) SELECT * FROM x',
      'SELECT (SELECT count(*) FROM newclient.orders) AS n',
      'SELECT * FROM shared_db.newclient.orders',
      "SELECT 'newclient.orders'::regclass",
      'SET search_path = newclient',
      'SELECT * FROM pg_catalog.pg_authid',
    ]) {
      const r = await post(p, '/v1/query', { query }, acme);
      assert.equal(r.status, 403, `${query}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body.error!.code, '42501', query);
    }
    const t = await post(p, '/v1/transaction', { queries: [{ query: 'SELECT 1' }, { query: 'SELECT * FROM newclient.orders' }] }, acme);
    assert.equal(t.status, 403);
    assert.equal(t.body.error!.query, '1');
    // The tenant's own rows, for contrast.
    const own = await post(p, '/v1/query', { query: 'SELECT count(*)::int AS n FROM orders' }, acme);
    assert.deepEqual(own.body.rows, [{ n: '3' }]);
  });

  it('/v1/transaction commits every statement together', async () => {
    const r = await post(
      p,
      '/v1/transaction',
      { queries: [1, 2, 3].map((v) => ({ query: 'INSERT INTO http_gw_all VALUES ($1)', params: [v] })).concat([{ query: 'SELECT sum(v)::int AS s FROM http_gw_all', params: [] }]) },
      acme,
    );
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body.results!.map((x) => [x.command, x.rowCount]), [['INSERT', 1], ['INSERT', 1], ['INSERT', 1], ['SELECT', 1]]);
    assert.deepEqual(r.body.results![3]!.rows, [{ s: '6' }]);
    assert.equal(await count('acme.http_gw_all'), 3);
  });

  it('a COMMIT among /v1/transaction queries is refused and nothing before it stays committed', async () => {
    const r = await post(p, '/v1/transaction', { queries: [{ query: 'INSERT INTO http_gw_commit VALUES (1)' }, { query: 'COMMIT' }, { query: 'INSERT INTO http_gw_commit VALUES (2)' }] }, acme);
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error!.code, '25000');
    assert.equal(await count('acme.http_gw_commit'), 0, 'the row inserted before the COMMIT was committed');
  });

  it('COMMIT AND CHAIN among /v1/transaction queries commits nothing when the request fails', async () => {
    const failed = await post(p, '/v1/transaction', { queries: [{ query: 'INSERT INTO http_gw_chain VALUES (1)' }, { query: 'COMMIT AND CHAIN' }, { query: 'SELECT 1/0' }] }, acme);
    assert.equal(failed.status, 400, JSON.stringify(failed.body));
    assert.equal(await count('acme.http_gw_chain WHERE v = 1'), 0, 'a failed /v1/transaction left its first row committed');
  });

  it('ROLLBACK AND CHAIN among /v1/transaction queries is not answered 200 with results that were discarded', async () => {
    const ok = await post(p, '/v1/transaction', { queries: [{ query: 'INSERT INTO http_gw_chain VALUES (10)' }, { query: 'ROLLBACK AND CHAIN' }, { query: 'INSERT INTO http_gw_chain VALUES (20)' }] }, acme);
    const stored = (await direct<{ v: number }>('SELECT v FROM acme.http_gw_chain WHERE v IN (10, 20) ORDER BY v', 'shared_db')).map((r) => r.v);
    if (ok.status === 200) {
      assert.deepEqual(ok.body.results!.map((r) => r.command), ['INSERT', 'ROLLBACK', 'INSERT']);
      assert.deepEqual(stored, [10, 20], 'answered 200 with both INSERTs, but the first one was rolled back');
    } else assert.deepEqual(stored, [], 'refused, yet rows stayed committed');
  });

  it('savepoints work inside /v1/transaction (SAVEPOINT, ROLLBACK TO, RELEASE are not refused)', async () => {
    const r = await post(
      p,
      '/v1/transaction',
      {
        queries: [
          { query: 'INSERT INTO http_gw_chain VALUES (30)' },
          { query: 'SAVEPOINT s1' },
          { query: 'INSERT INTO http_gw_chain VALUES (31)' },
          { query: 'ROLLBACK TO SAVEPOINT s1' },
          { query: 'RELEASE s1' },
        ],
      },
      acme,
    );
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const stored = (await direct<{ v: number }>('SELECT v FROM acme.http_gw_chain WHERE v IN (30, 31) ORDER BY v', 'shared_db')).map((x) => x.v);
    assert.deepEqual(stored, [30]);
  });

  it('a result over max_response_bytes is 413 and leaves nothing behind; one under it is served', async () => {
    const r = await post(p, '/v1/query', { query: "SELECT repeat('x', 1000) AS v FROM generate_series(1, 200)" }, acme);
    assert.equal(r.status, 413, JSON.stringify(r.body).slice(0, 300));
    assert.equal(r.body.error!.code, '54000');
    assert.match(r.body.error!.message, /max_response_bytes \(65536\)/);
    await noSessionsLeft(p);
    const ok = await post(p, '/v1/query', { query: "SELECT repeat('x', 1000) AS v FROM generate_series(1, 50)" }, acme);
    assert.equal(ok.status, 200);
    assert.equal(ok.body.rows!.length, 50);
  });

  it("HTTP queries count in the tenant's admin metrics (queries, rejections, http requests)", async () => {
    interface M { queries: number; rejections: { isolation: number; total: number }; http: { requests: number; failed: number } }
    const before = await adminJson<M>(p, '/tenants/acme/metrics');
    for (let i = 0; i < 5; i++) assert.equal((await post(p, '/v1/query', { query: 'SELECT $1::int AS i', params: [i] }, acme)).status, 200);
    assert.equal((await post(p, '/v1/query', { query: 'SELECT * FROM newclient.orders' }, acme)).status, 403);
    const after = await adminJson<M>(p, '/tenants/acme/metrics');
    assert.equal(after.queries - before.queries, 5);
    assert.equal(after.rejections.isolation - before.rejections.isolation, 1);
    assert.equal(after.http.requests - before.http.requests, 6);
    assert.equal(after.http.failed - before.http.failed, 1);
    const prom = await (await fetch(`http://127.0.0.1:${p.adminPort}/metrics/prometheus`)).text();
    assert.match(prom, /heliosproxy_http_requests_total\{tenant="acme"\} \d+/);
  });

  it('a client that hangs up mid-statement gets its backend query cancelled', async () => {
    const marker = 'http_gw_hangup_marker';
    const req = httpRequest({ host: '127.0.0.1', port: p.gatewayPort!, method: 'POST', path: '/v1/query', headers: { ...acme, 'content-type': 'application/json' } });
    req.on('error', () => undefined);
    req.end(JSON.stringify({ query: `SELECT pg_sleep(20) AS ${marker}` }));
    await eventually(async () => (await running(marker)) === 1, 5000, 'the statement to run');
    req.destroy();
    await eventually(async () => (await running(marker)) === 0, 3000, 'the backend statement to be cancelled');
    await noSessionsLeft(p);
  });

  it('many requests of every outcome leave no session, client or backend behind', async () => {
    const kinds = [
      () => post(p, '/v1/query', { query: 'SELECT 1' }, acme),
      () => post(p, '/v1/query', { query: 'SELECT 1/0' }, acme),
      () => post(p, '/v1/query', { query: 'SELECT * FROM newclient.orders' }, acme),
      () => post(p, '/v1/query', { query: 'SELEC oops' }, acme),
      () => post(p, '/v1/transaction', { queries: [{ query: 'SELECT 1' }, { query: 'SELECT 1/0' }] }, acme),
      () => post(p, '/v1/transaction', { queries: [{ query: 'SELECT 1' }, { query: 'SELECT 2' }] }, acme),
      () => post(p, '/v1/query', { query: 'SELECT current_database() AS d' }, { authorization: `Bearer ${WIDGET_KEY}`, 'x-tenant-id': 'widgetco' }),
      () => post(p, '/v1/query', { bad: true }, acme),
    ];
    // 40 at once: 35 for acme, under its client cap (rate_limits.max_connections = 50).
    const replies = await Promise.all(Array.from({ length: 40 }, (_, i) => kinds[i % kinds.length]!()));
    assert.deepEqual([...new Set(replies.map((r) => r.status))].sort(), [200, 400, 403]);
    await noSessionsLeft(p);
    // And the pool is still healthy afterwards.
    assert.equal((await post(p, '/v1/query', { query: 'SELECT 1 AS one' }, acme)).status, 200);
  });
});

describe('HTTP gateway: limits (qps_limit, max_query_duration, request_timeout_secs)', () => {
  let p: TestProxy;
  const acme = { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'acme' };
  const widget = { authorization: `Bearer ${WIDGET_KEY}`, 'x-tenant-id': 'widgetco' };
  before(async () => {
    p = await startProxy({
      toml: gatewayToml('request_timeout_secs = 2'),
      gateway: true,
      patch: (c) => {
        const [a, w] = c.multi_tenancy.tenants;
        a!.rate_limits!.max_query_duration = 1;
        a!.rate_limits!.max_connections = 1;
        w!.rate_limits!.qps_limit = 1;
        w!.rate_limits!.burst_multiplier = 1;
      },
    });
  });
  after(() => p.close());

  it('a statement over max_query_duration is 504 57014 naming the limit; meanwhile the client cap (max_connections = 1) is 429 53300', async () => {
    const t0 = Date.now();
    const slow = post(p, '/v1/query', { query: 'SELECT pg_sleep(5) AS http_gw_duration' }, acme);
    await eventually(async () => (await running('http_gw_duration')) === 1, 3000, 'the slow statement to run');
    const capped = await post(p, '/v1/query', { query: 'SELECT 1' }, acme);
    assert.equal(capped.status, 429, JSON.stringify(capped.body));
    assert.equal(capped.body.error!.code, '53300');
    assert.match(capped.body.error!.message, /too many connections for tenant "acme"/);
    const r = await slow;
    assert.equal(r.status, 504, JSON.stringify(r.body));
    assert.equal(r.body.error!.code, '57014');
    assert.match(r.body.error!.message, /max_query_duration/);
    assert.ok(Date.now() - t0 < 1900, `took ${Date.now() - t0} ms`);
  });

  it('a request over request_timeout_secs is 504 and its statement is cancelled', async () => {
    const t0 = Date.now();
    const r = await post(p, '/v1/query', { query: 'SELECT pg_sleep(5) AS http_gw_timeout' }, widget);
    assert.equal(r.status, 504, JSON.stringify(r.body));
    assert.equal(r.body.error!.code, '57014');
    assert.match(r.body.error!.message, /request_timeout_secs \(2 s\)/);
    const took = Date.now() - t0;
    assert.ok(took >= 1900 && took < 4000, `took ${took} ms`);
    assert.equal(await running('http_gw_timeout'), 0);
    await noSessionsLeft(p);
  });

  it('an empty qps bucket is 429 53400 with a Retry-After header', async () => {
    // The previous test took widgetco's one token 2 s ago: the bucket (1 token/s, capacity 1) is full again.
    const replies = [await post(p, '/v1/query', { query: 'SELECT 1' }, widget), await post(p, '/v1/query', { query: 'SELECT 1' }, widget)];
    assert.equal(replies[0]!.status, 200, JSON.stringify(replies[0]!.body));
    const limited = replies[1]!;
    assert.equal(limited.status, 429, JSON.stringify(limited.body));
    assert.equal(limited.body.error!.code, '53400');
    assert.match(limited.body.error!.detail ?? '', /Retry after \d+ ms/);
    const retryAfter = limited.headers.get('retry-after');
    assert.ok(retryAfter !== null && /^\d+$/.test(retryAfter) && Number(retryAfter) >= 1, `Retry-After: ${retryAfter}`);
  });
});

describe('HTTP gateway: request_timeout_secs while waiting for a backend', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({
      toml: gatewayToml('request_timeout_secs = 1'),
      gateway: true,
      patch: (c) => {
        // One backend for acme, waited for at most 3 s: a request can be stuck behind a wire client's transaction.
        const a = c.multi_tenancy.tenants[0]!;
        a.pool.max_connections = 1;
        a.pool.min_idle = 0;
        c.pool.min_connections = 0;
        c.pool.acquire_timeout_secs = 3;
      },
    });
  });
  after(() => p.close());

  it('a request waiting for a backend is answered 504 at request_timeout_secs', async () => {
    const holder = await p.connect('acme.appuser', 'shared_db');
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT 1');
      const t0 = Date.now();
      const r = await post(p, '/v1/query', { query: 'SELECT 1' }, { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'acme' });
      const took = Date.now() - t0;
      assert.equal(r.status, 504, `${took} ms: ${r.status} ${JSON.stringify(r.body)}`);
      assert.ok(took < 2000, `answered after ${took} ms`);
    } finally {
      await holder.query('ROLLBACK').catch(() => undefined);
      await holder.end();
    }
    await noSessionsLeft(p);
  });
});

describe('HTTP gateway: COPY FROM STDIN and retryable errors (tenants without permissions)', () => {
  let p: TestProxy;
  const widget = { authorization: `Bearer ${WIDGET_KEY}`, 'x-tenant-id': 'widgetco' };
  before(async () => {
    p = await startProxy({
      toml: gatewayToml('request_timeout_secs = 2'),
      gateway: true,
      guardrails: false,
      patch: (c) => {
        // One backend for widgetco, so every request (and the wire client below) meets the same one.
        const w = c.multi_tenancy.tenants[1]!;
        w.pool.max_connections = 1;
        w.pool.min_idle = 0;
        c.pool_mode.min_idle = 0;
        c.pool_mode.acquire_timeout_secs = 2;
      },
    });
  });
  after(() => p.close());

  it('serialization failures and deadlocks are 409 (retry), other SQL errors 400', async () => {
    for (const [code, status] of [['40001', 409], ['40P01', 409], ['23505', 400]] as const) {
      const r = await post(p, '/v1/query', { query: `DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '${code}'; END $$` }, widget);
      assert.equal(r.status, status, `${code}: ${JSON.stringify(r.body)}`);
      assert.equal(r.body.error!.code, code);
    }
  });

  it('COPY FROM STDIN over HTTP ends at once, copies nothing, and leaves a clean backend for the next request', async () => {
    const before = (await direct<{ n: number }>('SELECT count(*)::int AS n FROM orders', 'widgetco_db'))[0]!.n;
    const t0 = Date.now();
    const r = await post(p, '/v1/query', { query: 'COPY orders (customer, amount) FROM STDIN' }, widget);
    assert.ok(Date.now() - t0 < 1000, `took ${Date.now() - t0} ms (request_timeout_secs is 2)`);
    assert.notEqual(r.status, 200);
    assert.match(r.body.error!.message, /COPY FROM STDIN is not available over HTTP/);
    assert.equal((await direct<{ n: number }>('SELECT count(*)::int AS n FROM orders', 'widgetco_db'))[0]!.n, before);
    // The next requests (on the same backend: widgetco's pool holds one) are answered, not swallowed.
    try {
      const ins = await post(p, '/v1/query', { query: "INSERT INTO orders (customer, amount) VALUES ('http-gw-after-copy', 1) RETURNING customer" }, widget);
      assert.equal(ins.status, 200, JSON.stringify(ins.body));
      assert.deepEqual(ins.body.rows, [{ customer: 'http-gw-after-copy' }]);
      assert.equal((await direct<{ n: number }>("SELECT count(*)::int AS n FROM orders WHERE customer = 'http-gw-after-copy'", 'widgetco_db'))[0]!.n, 1);
    } finally {
      await direct("DELETE FROM orders WHERE customer = 'http-gw-after-copy'", 'widgetco_db');
    }
    await noSessionsLeft(p);
  });

  it('COPY FROM STDIN over HTTP is a client error (400 0A000), not 504 Gateway Timeout', async () => {
    const r = await post(p, '/v1/query', { query: 'COPY orders (customer, amount) FROM STDIN' }, widget);
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error!.code, '0A000');
  });

});

// The COPY path on the wire, next to the gateway's: the same session code keeps a backend's protocol state.
describe('COPY FROM STDIN abandoned on the wire', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({
      guardrails: false,
      patch: (c) => {
        // One backend for widgetco, so the next client meets the one the first client left.
        const w = c.multi_tenancy.tenants[1]!;
        w.pool.max_connections = 1;
        w.pool.min_idle = 0;
        c.pool_mode.min_idle = 0;
        c.pool_mode.acquire_timeout_secs = 2;
      },
    });
  });
  after(async () => {
    // A backend stuck waiting for a Sync (the bug below) ignores even Terminate and would keep this file alive.
    await direct("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'widgetco_db' AND usename = 'appuser' AND pid <> pg_backend_pid()");
    await p.close();
  });

  it('wire: a client that leaves after CopyFail without Sync does not hand a stuck backend to the next client', async () => {
    // The same client, with and without the Sync a CopyFail needs in the extended protocol.
    const abandonCopy = async (withSync: boolean): Promise<void> => {
      const raw = await new Promise<Socket>((resolve, reject) => {
        const s = netConnect({ host: '127.0.0.1', port: p.port }, () => resolve(s));
        s.once('error', reject);
      });
      const seen: Buffer[] = [];
      raw.on('data', (b: Buffer) => seen.push(b));
      raw.on('error', () => undefined);
      const until = async (what: string, ok: () => boolean): Promise<void> => eventually(ok, 3000, what);
      const text = (): string => Buffer.concat(seen).toString('latin1');
      // Zero-config login (no [auth] in this proxy): the cleartext password goes to the backend.
      raw.write(startupMessage({ user: 'widgetco.appuser', database: 'widgetco_db' }));
      await until('the password request', () => seen.length > 0);
      const pw = Buffer.from('apppass\0');
      const head = Buffer.alloc(5);
      head[0] = 0x70;
      head.writeInt32BE(4 + pw.length, 1);
      raw.write(Buffer.concat([head, pw]));
      await until('ReadyForQuery', () => /Z\0\0\0\x05I$/.test(text()));
      seen.length = 0;
      raw.write(Buffer.concat([parse('', 'COPY orders (customer, amount) FROM STDIN'), bindText('', '', []), describePortal(''), execute(''), SYNC]));
      await until('CopyInResponse', () => text().includes('G'));
      raw.write(withSync ? Buffer.concat([copyFail('the client gives up'), SYNC]) : copyFail('the client gives up'));
      await until('the COPY error', () => text().includes('COPY from stdin failed'));
      raw.destroy();
      await eventually(() => p.proxy.ctx.sessions.size === 0, 2000, 'the session to end');
    };
    const nextClientServed = async (): Promise<void> => {
      const c = new pg.Client({ ...p.clientConfig('widgetco.appuser', 'widgetco_db'), connectionTimeoutMillis: 1500 });
      c.on('error', () => undefined);
      try {
        await c.connect();
        const r = await Promise.race([c.query<{ n: number }>('SELECT 42::int AS n'), new Promise<never>((_, reject) => setTimeout(() => reject(new Error('the query got no answer in 1.5 s')), 1500))]);
        assert.equal(r.rows[0]!.n, 42);
      } finally {
        void c.end().catch(() => undefined);
      }
    };
    await abandonCopy(true);
    await nextClientServed();
    await abandonCopy(false);
    await nextClientServed();
  });
});

const external = Object.values(networkInterfaces())
  .flat()
  .find((i) => i !== undefined && i.family === 'IPv4' && !i.internal)?.address;

describe('HTTP gateway from a non-loopback address: credentials only over HTTPS', { skip: external === undefined ? 'no non-loopback IPv4 address' : false }, () => {
  let certs: TestCerts;
  const headers = { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'acme', 'content-type': 'application/json' };
  const body = JSON.stringify({ query: 'SELECT current_schema() AS s' });
  const start = (toml: (t: string) => string): Promise<ProxyServer> =>
    ProxyServer.start(loadTestConfig({ toml }), { logger: silentLogger(), listen: { host: '127.0.0.1', port: 0 }, admin: null, gateway: { host: external!, port: 0 } });
  before(async () => {
    certs = await testCerts();
  });

  it('plain HTTP is refused (403 28000) before the key is looked at; allow_plaintext_remote lets it through', async () => {
    let proxy = await start(gatewayToml());
    try {
      const r = await fetch(`http://${external}:${proxy.gatewayPort}/v1/query`, { method: 'POST', headers, body });
      assert.equal(r.status, 403);
      const b = (await r.json()) as Reply['body'];
      assert.equal(b.error!.code, '28000');
      assert.match(b.error!.message, /only over HTTPS or from loopback/);
    } finally {
      await proxy.close();
    }
    proxy = await start(gatewayToml('allow_plaintext_remote = true'));
    try {
      const r = await fetch(`http://${external}:${proxy.gatewayPort}/v1/query`, { method: 'POST', headers, body });
      assert.equal(r.status, 200);
      assert.deepEqual(((await r.json()) as Reply['body']).rows, [{ s: 'acme' }]);
    } finally {
      await proxy.close();
    }
  });

  it('HTTPS is served', async () => {
    const proxy = await start((t) => `${gatewayToml('tls = true')(t)}\n[tls]\ncert_file = ${JSON.stringify(certs.certFile)}\nkey_file = ${JSON.stringify(certs.keyFile)}\n`);
    try {
      const r = await new Promise<RawReply>((resolve, reject) => {
        const req = httpsRequest({ host: external, port: proxy.gatewayPort!, method: 'POST', path: '/v1/query', headers, ca: certs.ca, servername: 'localhost' }, (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
        });
        req.on('error', reject);
        req.end(body);
      });
      assert.equal(r.status, 200, r.text);
      assert.deepEqual((JSON.parse(r.text) as Reply['body']).rows, [{ s: 'acme' }]);
    } finally {
      await proxy.close();
    }
  });
});

describe('HTTPS: http_gateway.tls and admin_tls', () => {
  let p: TestProxy;
  let certs: TestCerts;
  before(async () => {
    certs = await testCerts();
    p = await startProxy({
      toml: (t) =>
        `admin_tls = true\n${gatewayToml('tls = true')(t)}\n[tls]\ncert_file = ${JSON.stringify(certs.certFile)}\nkey_file = ${JSON.stringify(certs.keyFile)}\n`,
      gateway: true,
      admin: true,
    });
  });
  after(() => p.close());

  it('the gateway serves HTTPS with [tls]\'s certificate, and refuses plain HTTP', async () => {
    const r = await raw(p.gatewayPort!, {
      path: '/v1/query',
      headers: { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'acme', 'content-type': 'application/json' },
      body: JSON.stringify({ query: 'SELECT current_schema() AS s' }),
      ca: certs.ca,
    });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual((JSON.parse(r.text) as Reply['body']).rows, [{ s: 'acme' }]);
    await assert.rejects(raw(p.gatewayPort!, { path: '/v1/query', headers: { authorization: `Bearer ${ACME_KEY}`, 'x-tenant-id': 'acme' }, body: '{}' }));
  });

  it('admin_tls: the admin API over HTTPS', async () => {
    const health = await raw(p.adminPort!, { method: 'GET', path: '/health', ca: certs.ca });
    assert.equal(health.status, 200, health.text);
    assert.equal((JSON.parse(health.text) as { status: string }).status, 'ok');
    const metrics = await raw(p.adminPort!, { method: 'GET', path: '/tenants/acme/metrics', ca: certs.ca });
    assert.equal(metrics.status, 200);
    await assert.rejects(fetch(`http://127.0.0.1:${p.adminPort}/health`));
  });
});
