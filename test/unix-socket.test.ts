// Backends reached over PostgreSQL's Unix-domain socket (`host = "/dir"`, as libpq and PgBouncer read it),
// on both socket layers: queries in transaction pooling land on backends with no client address (proof the
// socket was used), pipelining, a cancel (its CancelRequest travels over the socket too), readiness, a
// missing socket, and the backend_tls modes that cannot hold on a socket.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import postgres from 'postgres';
import { ConfigError, parseConfig, primaryNode } from '../src/config/load.js';
import { nativeSocketLayer } from '../src/io/native-socket.js';
import { superQuery, testPg } from './helpers/pg.js';
import { REFERENCE_TOML, startProxy, type TestProxy } from './helpers/proxy.js';

const T = { timeout: 30_000 };

async function adminGet(port: number, path: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, { headers: { authorization: 'Bearer test-admin-token-0123456789' } });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

for (const layer of ['native', 'node'] as const) {
  describe(`backends over a Unix-domain socket (socket_layer = "${layer}")`, () => {
    let p: TestProxy;
    let sql: postgres.Sql;
    before(async () => {
      p = await startProxy({
        admin: true,
        guardrails: false,
        patch: (c) => {
          primaryNode(c).host = testPg().socketDir;
          c.socket_layer = layer;
          // prefer: asked for over TCP; on a socket there is nothing to ask, and the login goes on in the clear.
          c.backend_tls = { mode: 'prefer' };
          c.admin_token = 'test-admin-token-0123456789';
        },
      });
      sql = postgres({ host: '127.0.0.1', port: p.port, user: 'acme.appuser', password: 'apppass', database: 'shared_db', max: 4, prepare: true, onnotice: () => {} });
    });
    after(async () => {
      await sql?.end({ timeout: 5 });
      await p?.close();
    });

    test('queries run on backends connected through the socket (no client address in pg_stat_activity)', T, async () => {
      const rows = await sql`SELECT count(*)::int AS n FROM orders`;
      assert.ok(rows[0]!.n >= 0);
      const [row] = await sql`SELECT inet_client_addr() AS addr, current_schema() AS schema`;
      assert.equal(row!.addr, null, 'a Unix-domain socket connection has no client address');
      assert.equal(row!.schema, 'acme');
      const tcp = await superQuery("SELECT count(*) FROM pg_stat_activity WHERE usename = 'appuser' AND client_addr IS NOT NULL AND application_name = ''");
      const unix = Number(await superQuery("SELECT count(*) FROM pg_stat_activity WHERE usename = 'appuser' AND client_addr IS NULL"));
      assert.ok(unix >= 1, `backends on the socket: ${unix} (TCP ones from other tests: ${tcp})`);
    });

    test('500 pipelined queries over 4 connections, in order', T, async () => {
      const results = await Promise.all(Array.from({ length: 500 }, (_, i) => sql`SELECT ${i}::int AS i`));
      results.forEach((r, i) => assert.equal(r[0]!.i, i));
    });

    test('a cancel reaches the backend through the socket', T, async () => {
      const started = Date.now();
      const q = sql`SELECT pg_sleep(20)`;
      setTimeout(() => q.cancel(), 300);
      await assert.rejects(q, (err: Error & { code?: string }) => err.code === '57014');
      assert.ok(Date.now() - started < 10_000);
      const [row] = await sql`SELECT 1 AS one`;
      assert.equal(row!.one, 1, 'the connection goes on after the cancel');
    });

    test('the admin API: ready, and the layer the backends are on', T, async () => {
      const ready = await adminGet(p.adminPort!, '/ready');
      assert.equal(ready.status, 200, JSON.stringify(ready.body));
      const global = await adminGet(p.adminPort!, '/metrics');
      const sockets = global.body.socket_layer as { mode: string; native_sockets: number };
      assert.equal(sockets.mode, layer === 'native' && nativeSocketLayer.available ? 'native' : 'node');
      // Backends on the socket were moved onto the native layer like TCP ones.
      if (sockets.mode === 'native') assert.ok(sockets.native_sockets >= 2, JSON.stringify(sockets));
    });
  });
}

describe('Unix-domain socket: failures and configuration', () => {
  test('a socket directory with no PostgreSQL: the client gets 08006 naming the socket, /ready says why', T, async () => {
    const p = await startProxy({
      admin: true,
      patch: (c) => {
        primaryNode(c).host = '/nonexistent-helios-dir';
        primaryNode(c).port = 5999;
        c.admin_token = 'test-admin-token-0123456789';
      },
    });
    try {
      const sql = postgres({ host: '127.0.0.1', port: p.port, user: 'acme.appuser', password: 'apppass', database: 'shared_db', max: 1, connect_timeout: 10, onnotice: () => {} });
      try {
        await assert.rejects(sql`SELECT 1`, (err: Error & { code?: string }) => {
          assert.equal(err.code, '08006');
          assert.match(err.message, /\/nonexistent-helios-dir\/\.s\.PGSQL\.5999/);
          return true;
        });
      } finally {
        await sql.end({ timeout: 2 });
      }
      const ready = await adminGet(p.adminPort!, '/ready');
      assert.equal(ready.status, 503);
      assert.match(String(ready.body.error), /\/nonexistent-helios-dir\/\.s\.PGSQL\.5999/);
    } finally {
      await p.close();
    }
  });

  test('backend_tls modes that require TLS are refused at load for a socket host, naming the key', () => {
    for (const mode of ['require', 'verify-full']) {
      const text = REFERENCE_TOML.replace(/^host\s*=\s*".*"$/m, 'host = "/var/run/postgresql"') + `\n[backend_tls]\nmode = "${mode}"\n`;
      assert.throws(() => parseConfig(text, 'unix.toml'), (err: unknown) => {
        assert.ok(err instanceof ConfigError, String(err));
        assert.match(err.message, /backend_tls\.mode: "(require|verify-full)" cannot hold for nodes\[0\]\.host "\/var\/run\/postgresql"/);
        return true;
      });
    }
    const ok = REFERENCE_TOML.replace(/^host\s*=\s*".*"$/m, 'host = "/var/run/postgresql"') + '\n[backend_tls]\nmode = "prefer"\n';
    assert.equal(primaryNode(parseConfig(ok, 'unix.toml').config).host, '/var/run/postgresql');
  });
});
