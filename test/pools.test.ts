// Pools: caps that hold under load (shared pool, tenant cap, dedicated pool), the three pool modes, acquire
// timeouts, what a killed client leaves behind, and maintenance (min_idle warm-up, idle_timeout,
// max_lifetime). The backend is watched directly as superuser through pg_stat_activity.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import postgres from 'postgres';
import type { Config } from '../src/config/schema.js';
import { runPsql, testPg } from './helpers/pg.js';
import { direct, eventually, pgError, startProxy, type TestProxy } from './helpers/proxy.js';

interface PoolStats { name: string; database: string; role: string; idle: number; active: number; connecting: number; waiting: number; max: number }
interface TenantStats { id: string; clients: number; backends_in_use: number }

async function pools(p: TestProxy): Promise<PoolStats[]> {
  const res = await fetch(`http://127.0.0.1:${p.adminPort}/pools`);
  return ((await res.json()) as { pools: PoolStats[] }).pools;
}
async function pool(p: TestProxy, name: string): Promise<PoolStats | undefined> {
  return (await pools(p)).find((x) => x.name === name);
}
/** The live counts of GET /tenants/:id (the tenant's view carries them under "live"). */
async function tenant(p: TestProxy, id: string): Promise<TenantStats> {
  const res = await fetch(`http://127.0.0.1:${p.adminPort}/tenants/${id}`);
  const body = (await res.json()) as { live?: TenantStats };
  assert.ok(body.live, `GET /tenants/${id} has live counts: ${JSON.stringify(body)}`);
  return body.live;
}

const SHARED = 'shared/shared_db/appuser';
const WIDGETCO = 'widgetco/widgetco_db/appuser';

const tenantCfg = (c: Config, id: string): Config['multi_tenancy']['tenants'][number] => {
  const t = c.multi_tenancy.tenants.find((x) => x.id === id);
  assert.ok(t, `tenant ${id} in the reference config`);
  return t;
};

/** One long-lived superuser connection for watching the backend (a new one per sample would be too slow). */
let monitor: pg.Client;

async function count(where: string, database = 'shared_db'): Promise<number> {
  const r = await monitor.query<{ n: string }>(
    `SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'appuser' AND datname = $1 AND backend_type = 'client backend' AND (${where})`,
    [database],
  );
  return Number(r.rows[0]!.n);
}

/** Samples `fn` every `everyMs` until stopped; returns every value seen. */
function sampler(fn: () => Promise<number>, everyMs = 10): { stop: () => Promise<number[]> } {
  const seen: number[] = [];
  let running = true;
  const loop = (async () => {
    while (running) {
      seen.push(await fn());
      await sleep(everyMs);
    }
  })();
  return {
    stop: async () => {
      running = false;
      await loop;
      return seen;
    },
  };
}


/** Each describe starts from a backend with no appuser connections of earlier proxies. */
async function noAppuserBackends(): Promise<void> {
  await eventually(async () => (await count('true', 'shared_db')) + (await count('true', 'widgetco_db')) === 0, 5000, 'appuser backends of earlier proxies to go away');
}

/** Connects `n` node-postgres clients at once; each gets a no-op error listener (some are killed on purpose). */
async function connectMany(p: TestProxy, user: string, database: string, n: number): Promise<pg.Client[]> {
  return Promise.all(
    Array.from({ length: n }, async () => {
      const c = new pg.Client(p.clientConfig(user, database));
      c.on('error', () => {});
      await c.connect();
      return c;
    }),
  );
}

/** Ends clients, destroying the socket of any that does not finish within 2 s. */
const endAll = (cs: pg.Client[]): Promise<unknown> =>
  Promise.all(
    cs.map((c) =>
      Promise.race([c.end().catch(() => undefined), sleep(2000).then(() => c.connection.stream.destroy())]),
    ),
  );

/**
 * Closes a test proxy. ProxyServer.close() waits for every client socket to close before it ends any
 * session, so a client left behind by a failed test would hang the file: end the sessions ourselves then.
 */
async function closeProxy(p: TestProxy | undefined): Promise<void> {
  if (p === undefined) return;
  const closed = p.close();
  if (!(await Promise.race([closed.then(() => true), sleep(3000).then(() => false)]))) {
    for (const s of [...p.proxy.ctx.sessions]) s.socket.destroy();
    await closed;
  }
  // A backend connection the pool lost track of outlives close() and would hold this process open and
  // spoil the next test's counts: terminate leftovers once they had time to go by themselves.
  try {
    await eventually(async () => (await count('true', 'shared_db')) + (await count('true', 'widgetco_db')) === 0, 2000, 'backends to close');
  } catch {
    const pids = (await monitor.query<{ pid: number }>("SELECT pid FROM pg_stat_activity WHERE usename = 'appuser'")).rows.map((r) => r.pid);
    await monitor.query('SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p', [pids]);
    console.log(`# closeProxy: terminated ${pids.length} appuser backend(s) still open after proxy.close()`);
  }
}

/** One login so the proxy learns the role's password: later logins are verified without a backend. */
async function learnPassword(p: TestProxy): Promise<void> {
  const c = await p.connect('acme.appuser', 'shared_db');
  await c.end();
}

const T = { timeout: 30_000 };

before(async () => {
  const db = testPg();
  monitor = new pg.Client({ host: db.host, port: db.port, user: db.superuser, password: db.password, database: 'postgres' });
  await monitor.connect();
  // Test files run one after another: an appuser backend still open now was left behind by an earlier
  // file's proxy. Clear it so this file's counts are its own.
  try {
    await eventually(async () => (await count('true', 'shared_db')) + (await count('true', 'widgetco_db')) === 0, 3000, 'backends of earlier files to close');
  } catch {
    const pids = (await monitor.query<{ pid: number }>("SELECT pid FROM pg_stat_activity WHERE usename = 'appuser'")).rows.map((r) => r.pid);
    await monitor.query('SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p', [pids]);
    console.log(`# pools.test.ts: terminated ${pids.length} appuser backend(s) left open by an earlier test file`);
  }
});
after(async () => {
  await monitor?.end();
});

describe('caps hold under load (transaction mode)', () => {
  let p: TestProxy;
  const clients: pg.Client[] = [];
  before(async () => {
    await noAppuserBackends();
    p = await startProxy({
      admin: true,
      patch: (c) => {
        c.pool.max_connections = 10;
        // 50 clients x 20 transactions x 4 statements in a few seconds is far above acme's qps_limit (1000,
        // burst 2.0): this describe is about pool caps, so the token bucket is widened, nothing else changes.
        const rl = tenantCfg(c, 'acme').rate_limits;
        assert.ok(rl, 'acme has rate_limits in the reference config');
        rl.qps_limit = 1_000_000;
      },
    });
    // One login first, so the proxy has learned the password and the 50 logins below verify locally
    // (concurrent first logins have their own test below).
    await learnPassword(p);
  });
  after(async () => {
    await endAll(clients);
    await closeProxy(p);
  });

  test('50 concurrent acme clients x 20 transactions never use more than pool.max_connections = 10 backends', T, async () => {
    clients.push(...(await connectMany(p, 'acme.appuser', 'shared_db', 50)));
    const watch = sampler(() => count('true'));
    const watchAdmin = sampler(async () => {
      const s = await pool(p, SHARED);
      return s === undefined ? 0 : s.idle + s.active + s.connecting;
    }, 20);
    const started = Date.now();
    let done = 0;
    await Promise.all(
      clients.map(async (c) => {
        for (let i = 0; i < 20; i++) {
          await c.query('BEGIN');
          const r1 = await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid, pg_sleep(0.01)');
          const r2 = await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
          assert.equal(r2.rows[0]!.pid, r1.rows[0]!.pid, 'a transaction stays on one backend');
          await c.query('COMMIT');
          done++;
        }
      }),
    );
    const elapsed = Date.now() - started;
    const seen = await watch.stop();
    const seenAdmin = await watchAdmin.stop();
    assert.equal(done, 1000);
    const max = Math.max(...seen);
    assert.ok(max <= 10, `at most 10 backends in shared_db, saw ${max}`);
    assert.ok(max >= 5, `the load should have driven the pool near its cap, saw at most ${max}`);
    assert.ok(Math.max(...seenAdmin) <= 10, `the pool's own size stayed <= 10, saw ${Math.max(...seenAdmin)}`);
    assert.ok(elapsed < 20_000, `took ${elapsed} ms`);
    const s = await pool(p, SHARED);
    assert.equal(s?.waiting, 0);
    assert.equal(s?.active, 0);
    assert.equal((await tenant(p, 'acme')).backends_in_use, 0);
  });
});

// Before any client has logged in, the proxy has no password for the role: each login is checked by opening
// a backend connection with the client's password. More such logins than the cap allows must still queue.
describe('concurrent first logins (no password learned yet) respect the caps', () => {
  const firstLogins = async (p: TestProxy, user: string, database: string, n: number, watchDb: string, cap: number, poolName: string, tenantId: string): Promise<void> => {
    // The pool's own count (a backend closed to make room may linger in pg_stat_activity for a moment).
    const watch = sampler(async () => {
      const st = await pool(p, poolName);
      return st === undefined ? 0 : st.idle + st.active + st.connecting;
    });
    const clients: pg.Client[] = [];
    try {
      const results = await Promise.allSettled(
        Array.from({ length: n }, async () => {
          const c = new pg.Client(p.clientConfig(user, database));
          c.on('error', () => {});
          clients.push(c);
          await c.connect();
          await c.query('SELECT 1');
        }),
      );
      const seen = await watch.stop();
      const failed = results.flatMap((r) => (r.status === 'rejected' ? [String(r.reason)] : []));
      assert.deepEqual(failed, [], `all ${n} logins succeed`);
      assert.ok(Math.max(...seen) <= cap, `at most ${cap} connections in ${poolName}, saw ${Math.max(...seen)}`);
      assert.ok((await count('true', watchDb)) <= cap, `at most ${cap} backends in ${watchDb} once the logins are done`);
      await eventually(async () => (await pool(p, poolName))?.active === 0, 2000, `${poolName} to have no busy connection`).catch(() => undefined);
      const st = await pool(p, poolName);
      assert.ok(st);
      assert.equal(st.active, 0, `no connection stays busy once every client is idle: ${JSON.stringify(st)}`);
      assert.ok(st.idle + st.active + st.connecting <= cap, `pool size within the cap: ${JSON.stringify(st)}`);
      assert.equal((await tenant(p, tenantId)).backends_in_use, 0, `${tenantId} backends_in_use back to 0`);
    } finally {
      await endAll(clients);
    }
  };

  test('6 first logins with the shared pool capped at 2', T, async () => {
    await noAppuserBackends();
    const p = await startProxy({
      admin: true,
      patch: (c) => {
        c.pool.max_connections = 2;
        c.pool.min_connections = 0;
        c.pool.acquire_timeout_secs = 3;
        tenantCfg(c, 'acme').pool.min_idle = 0;
      },
    });
    try {
      await firstLogins(p, 'acme.appuser', 'shared_db', 6, 'shared_db', 2, SHARED, 'acme');
    } finally {
      await closeProxy(p);
    }
  });

  test('4 first logins with widgetco\'s dedicated pool capped at 3', T, async () => {
    await noAppuserBackends();
    const p = await startProxy({
      admin: true,
      patch: (c) => {
        c.pool_mode.acquire_timeout_secs = 3;
        tenantCfg(c, 'widgetco').pool.max_connections = 3;
        tenantCfg(c, 'widgetco').pool.min_idle = 0;
      },
    });
    try {
      await firstLogins(p, 'widgetco.appuser', 'widgetco_db', 4, 'widgetco_db', 3, WIDGETCO, 'widgetco');
    } finally {
      await closeProxy(p);
    }
  });
});

describe('tenant cap on the shared pool; the dedicated pool is unaffected', () => {
  let p: TestProxy;
  const clients: pg.Client[] = [];
  before(async () => {
    await noAppuserBackends();
    p = await startProxy({
      admin: true,
      patch: (c) => {
        tenantCfg(c, 'acme').pool.max_connections = 3;
      },
    });
    await learnPassword(p);
  });
  after(async () => {
    await endAll(clients);
    await closeProxy(p);
  });

  test('acme (pool.max_connections = 3) holds at most 3 backends while widgetco runs 5 transactions at once', T, async () => {
    const acme = await connectMany(p, 'acme.appuser', 'shared_db', 5);
    const widget = await connectMany(p, 'widgetco.appuser', 'widgetco_db', 5);
    clients.push(...acme, ...widget);
    const watch = sampler(() => count("state <> 'idle'"));

    // Every acme client opens a transaction; only 3 can have a backend, the other 2 queue.
    const begun: boolean[] = acme.map(() => false);
    const acmeTx = acme.map(async (c, i) => {
      await c.query('BEGIN');
      begun[i] = true;
      await c.query('SELECT 1');
    });
    await eventually(async () => (await count("state = 'idle in transaction'")) === 3, 3000, '3 acme transactions');
    await sleep(300);
    assert.equal(begun.filter(Boolean).length, 3, 'the 4th and 5th acme client wait for a backend');
    assert.equal(await count("state <> 'idle'"), 3);
    assert.equal((await tenant(p, 'acme')).backends_in_use, 3);
    assert.equal((await pool(p, SHARED))?.waiting, 2);

    // widgetco is not held back by acme's cap: 5 transactions open at once.
    await Promise.all(widget.map((c) => c.query('BEGIN').then(() => c.query('SELECT 1'))));
    assert.equal(await count("state = 'idle in transaction'", 'widgetco_db'), 5);
    assert.equal((await tenant(p, 'widgetco')).backends_in_use, 5);

    // Committing acme's transactions lets the queued ones through, still at most 3 at a time.
    const firstThree = begun.slice();
    await Promise.all(acme.filter((_, i) => firstThree[i]).map((c) => c.query('COMMIT')));
    await Promise.all(acmeTx);
    await Promise.all(acme.filter((_, i) => !firstThree[i]).map((c) => c.query('COMMIT')));
    await Promise.all(widget.map((c) => c.query('COMMIT')));
    const seen = await watch.stop();
    assert.ok(Math.max(...seen) <= 3, `acme never had more than 3 backends in use, saw ${Math.max(...seen)}`);
    assert.equal((await tenant(p, 'acme')).backends_in_use, 0);
    assert.equal((await tenant(p, 'widgetco')).backends_in_use, 0);
  });

  test('under load: 20 acme clients never have more than 3 backends in use, widgetco keeps its throughput', T, async () => {
    const acme = await connectMany(p, 'acme.appuser', 'shared_db', 20);
    const widget = await connectMany(p, 'widgetco.appuser', 'widgetco_db', 5);
    clients.push(...acme, ...widget);
    const watchAcme = sampler(() => count("state <> 'idle'"));
    const watchWidget = sampler(() => count("state <> 'idle'", 'widgetco_db'));
    const run = (c: pg.Client, n: number) =>
      (async () => {
        for (let i = 0; i < n; i++) {
          await c.query('BEGIN');
          await c.query('SELECT pg_sleep(0.02)');
          await c.query('COMMIT');
        }
      })();
    const acmeDone = Promise.all(acme.map((c) => run(c, 5)));
    const t0 = Date.now();
    await Promise.all(widget.map((c) => run(c, 5)));
    const widgetMs = Date.now() - t0;
    await acmeDone;
    const acmeSeen = await watchAcme.stop();
    const widgetSeen = await watchWidget.stop();
    assert.ok(Math.max(...acmeSeen) <= 3, `acme in-use backends <= 3, saw ${Math.max(...acmeSeen)}`);
    assert.ok(Math.max(...widgetSeen) >= 4, `widgetco ran concurrently (saw at most ${Math.max(...widgetSeen)} busy backends)`);
    // 5 x 20 ms in a row per client; serialized behind acme it would take >= 100 x 20 ms / 3.
    assert.ok(widgetMs < 600, `widgetco's 25 transactions took ${widgetMs} ms`);
  });
});

describe('dedicated pool', () => {
  test('widgetco draws from its own pool widgetco/widgetco_db/appuser capped at its pool.max_connections', T, async () => {
    await noAppuserBackends();
    const p = await startProxy({ admin: true });
    try {
      const w = await p.connect('widgetco.appuser', 'widgetco_db');
      const a = await p.connect('acme.appuser', 'shared_db');
      await w.query('SELECT 1');
      await a.query('SELECT 1');
      const all = await pools(p);
      const wp = all.find((x) => x.name === WIDGETCO);
      assert.ok(wp, `pools: ${all.map((x) => x.name).join(', ')}`);
      assert.equal(wp.database, 'widgetco_db');
      assert.equal(wp.role, 'appuser');
      assert.equal(wp.max, 20, 'widgetco pool.max_connections');
      const sp = all.find((x) => x.name === SHARED);
      assert.ok(sp);
      assert.equal(sp.database, 'shared_db');
      assert.equal(all.filter((x) => x.database === 'widgetco_db').length, 1, 'widgetco has no connections in the shared pool');
      await w.end();
      await a.end();
    } finally {
      await closeProxy(p);
    }
  });

  test('the dedicated cap is widgetco\'s own (3), not the shared pool\'s (2), and neither blocks the other', T, async () => {
    await noAppuserBackends();
    const p = await startProxy({
      admin: true,
      patch: (c) => {
        c.pool.max_connections = 2;
        c.pool.min_connections = 0;
        tenantCfg(c, 'widgetco').pool.max_connections = 3;
        tenantCfg(c, 'widgetco').pool.min_idle = 0;
        tenantCfg(c, 'acme').pool.min_idle = 0;
      },
    });
    const clients: pg.Client[] = [];
    try {
      await learnPassword(p);
      const widget = await connectMany(p, 'widgetco.appuser', 'widgetco_db', 4);
      const acme = await connectMany(p, 'acme.appuser', 'shared_db', 2);
      clients.push(...widget, ...acme);
      let fourth = false;
      await Promise.all(widget.slice(0, 3).map((c) => c.query('BEGIN')));
      const w4 = widget[3]!.query('BEGIN').then(() => (fourth = true));
      await Promise.all(acme.map((c) => c.query('BEGIN').then(() => c.query('SELECT 1'))));
      assert.equal(await count("state = 'idle in transaction'", 'shared_db'), 2, 'acme uses the whole shared pool');
      assert.equal(await count('true', 'widgetco_db'), 3, 'widgetco holds 3 backends, more than the shared cap');
      await sleep(200);
      assert.equal(fourth, false, 'the 4th widgetco transaction waits for its pool');
      const wp = await pool(p, WIDGETCO);
      assert.equal(wp?.max, 3);
      assert.equal(wp?.waiting, 1);
      await widget[0]!.query('COMMIT');
      await w4;
      assert.equal(fourth, true);
      await Promise.all([...widget.slice(1), ...acme].map((c) => c.query('COMMIT')));
      assert.ok((await count('true', 'widgetco_db')) <= 3);
    } finally {
      await endAll(clients);
      await closeProxy(p);
    }
  });
});

describe('session mode: one backend per client for its life', () => {
  let p: TestProxy;
  before(async () => {
    await noAppuserBackends();
    p = await startProxy({
      mode: 'session',
      admin: true,
      patch: (c) => {
        c.pool.max_connections = 5;
      },
    });
    await learnPassword(p);
  });
  after(() => closeProxy(p));

  test('5 clients hold 5 distinct backends; a 6th waits; after they leave the backends are reset and idle', T, async () => {
    const cs = await connectMany(p, 'acme.appuser', 'shared_db', 5);
    const pids: number[] = [];
    for (const c of cs) {
      const a = (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
      await c.query("SET work_mem = '7MB'");
      const b = (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
      assert.equal(a, b, 'a session-mode client keeps its backend');
      pids.push(a);
    }
    assert.equal(new Set(pids).size, 5);
    const s = await pool(p, SHARED);
    assert.equal(s?.active, 5);
    assert.equal((await tenant(p, 'acme')).backends_in_use, 5);

    // A 6th client needs a backend for its whole session: it waits until one is given back.
    let sixthIn = false;
    const sixth = new pg.Client(p.clientConfig('acme.appuser', 'shared_db'));
    sixth.on('error', () => {});
    const sixthConnect = sixth.connect().then(() => (sixthIn = true));
    await sleep(300);
    assert.equal(sixthIn, false);
    assert.equal((await pool(p, SHARED))?.waiting, 1);
    await cs[0]!.end();
    await sixthConnect;
    const pid6 = (await sixth.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
    assert.equal(pid6, pids[0], 'the 6th client gets the backend the first one gave back');
    assert.equal((await sixth.query<{ work_mem: string }>('SHOW work_mem')).rows[0]!.work_mem, (await direct<{ work_mem: string }>('SHOW work_mem', 'shared_db'))[0]!.work_mem);
    await sixth.end();

    await endAll(cs.slice(1));
    await eventually(async () => {
      const st = await pool(p, SHARED);
      return st !== undefined && st.active === 0 && st.idle >= 5;
    }, 3000, 'all 5 backends back in the pool, idle');
    const rows = await monitor.query<{ pid: number; state: string; query: string }>('SELECT pid, state, query FROM pg_stat_activity WHERE pid = ANY($1::int[]) ORDER BY pid', [pids]);
    assert.equal(rows.rows.length, 5, 'the backends were kept, not closed');
    for (const r of rows.rows) {
      assert.equal(r.state, 'idle');
      assert.equal(r.query, 'DISCARD ALL', `backend ${r.pid} was reset with reset_query`);
    }
    assert.equal((await tenant(p, 'acme')).backends_in_use, 0);
  });

  test('a session-mode client killed mid-transaction leaves no open transaction', T, async () => {
    const c = new pg.Client(p.clientConfig('acme.appuser', 'shared_db'));
    c.on('error', () => {});
    await c.connect();
    await c.query('BEGIN');
    await c.query('SELECT pg_advisory_xact_lock(99)');
    c.connection.stream.destroy();
    await eventually(async () => (await count("state LIKE 'idle in transaction%'")) === 0, 3000, 'no idle-in-transaction backend');
    const locks = await direct<{ n: string }>("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'", 'shared_db');
    assert.equal(locks[0]!.n, '0');
  });
});

describe('statement mode', () => {
  let p: TestProxy;
  let c: pg.Client;
  before(async () => {
    await noAppuserBackends();
    p = await startProxy({ mode: 'statement' });
    c = await p.connect('acme.appuser', 'shared_db');
    c.on('error', () => {});
  });
  after(async () => {
    await c?.end().catch(() => undefined);
    await closeProxy(p);
  });

  test('single statements work', T, async () => {
    assert.equal((await c.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
    assert.equal((await c.query<{ n: string }>('SELECT count(*) AS n FROM orders')).rows[0]!.n, '3');
    assert.equal((await c.query<{ n: number }>('SELECT $1::int AS n', [7])).rows[0]!.n, 7);
  });

  test('BEGIN is refused with 25001 (statement pooling), the connection stays usable, no transaction stays open', T, async () => {
    const err = await pgError(c.query('BEGIN'));
    assert.equal(err.code, '25001');
    assert.match(err.message, /statement pooling/);
    assert.equal((await c.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
    await eventually(async () => (await count("state LIKE 'idle in transaction%'")) === 0, 2000, 'no open transaction on the backend');
    // the extended protocol gets the same answer
    const q = { text: 'BEGIN', queryMode: 'extended' };
    const err2 = await pgError(c.query(q));
    assert.equal(err2.code, '25001');
    assert.equal((await c.query<{ n: number }>('SELECT 2 AS n')).rows[0]!.n, 2);
    await eventually(async () => (await count("state LIKE 'idle in transaction%'")) === 0, 2000, 'no open transaction on the backend');
  });

  test('postgres.js sql.begin() is refused with 25001 and the pool stays usable', T, async () => {
    const sql = postgres({ host: '127.0.0.1', port: p.port, user: 'acme.appuser', password: 'apppass', database: 'shared_db', max: 1, onnotice: () => {} });
    try {
      await assert.rejects(
        sql.begin((tx) => tx`SELECT 1`),
        (e: unknown) => e instanceof Error && (e as Error & { code?: string }).code === '25001',
      );
      const [r] = await sql<{ n: number }[]>`SELECT 3 AS n`;
      assert.equal(r!.n, 3);
    } finally {
      await sql.end({ timeout: 1 });
    }
    await eventually(async () => (await count("state LIKE 'idle in transaction%'")) === 0, 2000, 'no open transaction on the backend');
  });

  test('psql: BEGIN fails with the statement-pooling message, the next command runs', T, async () => {
    const r = await runPsql(['-h', '127.0.0.1', '-p', String(p.port), '-U', 'acme.appuser', '-d', 'shared_db', '-At', '-c', 'BEGIN', '-c', 'SELECT 42'], { PGPASSWORD: 'apppass' });
    assert.match(r.stderr, /ERROR: {2}transaction blocks are not allowed in statement pooling mode/);
    assert.match(r.stdout, /^42$/m);
  });
});

describe('acquire timeout', () => {
  let p: TestProxy;
  before(async () => {
    await noAppuserBackends();
    p = await startProxy({
      patch: (c) => {
        c.pool.max_connections = 1;
        c.pool.min_connections = 0;
        c.pool.acquire_timeout_secs = 1;
      },
    });
  });
  after(() => closeProxy(p));

  test('with the only backend held by a transaction, another client fails in ~1 s with 53300; the holder commits fine', T, async () => {
    const a = await p.connect('acme.appuser', 'shared_db');
    const b = await p.connect('acme.appuser', 'shared_db');
    b.on('error', () => {});
    try {
      await a.query('BEGIN');
      await a.query('SELECT 1');
      const t0 = Date.now();
      const err = await pgError(b.query('SELECT 1'));
      const waited = Date.now() - t0;
      assert.equal(err.code, '53300');
      assert.match(err.message, /timed out/);
      assert.ok(waited >= 900 && waited <= 2500, `failed after ${waited} ms`);

      // A login needs a backend too: psql gets the same error while the transaction is open.
      const t1 = Date.now();
      const r = await runPsql(['-h', '127.0.0.1', '-p', String(p.port), '-U', 'acme.appuser', '-d', 'shared_db', '-At', '-c', 'SELECT 1'], { PGPASSWORD: 'apppass' });
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /timed out/);
      assert.ok(Date.now() - t1 <= 3000);

      assert.equal((await a.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
      await a.query('COMMIT');
      const c = await p.connect('acme.appuser', 'shared_db');
      assert.equal((await c.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
      await c.end();
    } finally {
      await a.end();
      await b.end().catch(() => undefined);
    }
  });
});

describe('a killed client leaves nothing behind (transaction mode)', () => {
  let p: TestProxy;
  before(async () => {
    await noAppuserBackends();
    await direct('CREATE TABLE acme.pool_scratch (id int PRIMARY KEY, note text); ALTER TABLE acme.pool_scratch OWNER TO appuser', 'shared_db');
    p = await startProxy({ admin: true });
    await learnPassword(p);
  });
  after(async () => {
    await closeProxy(p);
    await direct('DROP TABLE IF EXISTS acme.pool_scratch', 'shared_db');
  });

  test('killed mid-transaction: the transaction is rolled back within 3 s', T, async () => {
    const c = new pg.Client(p.clientConfig('acme.appuser', 'shared_db'));
    c.on('error', () => {});
    await c.connect();
    await c.query('BEGIN');
    await c.query("INSERT INTO pool_scratch VALUES (1, 'killed mid-transaction')");
    assert.equal(await count("state = 'idle in transaction'"), 1);
    const t0 = Date.now();
    c.connection.stream.destroy();
    await eventually(async () => (await count("state LIKE 'idle in transaction%'")) === 0, 3000, 'no idle-in-transaction backend for appuser');
    const rows = await direct<{ n: string }>('SELECT count(*) AS n FROM acme.pool_scratch', 'shared_db');
    assert.equal(rows[0]!.n, '0', 'the inserted row was rolled back');
    const locks = await direct<{ n: string }>("SELECT count(*) AS n FROM pg_locks WHERE relation = 'acme.pool_scratch'::regclass", 'shared_db');
    assert.equal(locks[0]!.n, '0');
    assert.ok(Date.now() - t0 < 3000);
    await eventually(async () => (await tenant(p, 'acme')).backends_in_use === 0, 2000, 'acme backends_in_use back to 0');
    await eventually(async () => (await tenant(p, 'acme')).clients === 0, 2000, 'acme clients back to 0');
  });

  test('killed while a query runs: the backend stops running it within 3 s', T, async () => {
    const c = new pg.Client(p.clientConfig('acme.appuser', 'shared_db'));
    c.on('error', () => {});
    await c.connect();
    const running = c.query('SELECT pg_sleep(5)').catch(() => undefined);
    await eventually(async () => (await count("state = 'active' AND query = 'SELECT pg_sleep(5)'")) === 1, 2000, 'pg_sleep(5) running');
    const t0 = Date.now();
    c.connection.stream.destroy();
    await eventually(async () => (await count("query = 'SELECT pg_sleep(5)' AND state = 'active'")) === 0, 3000, 'pg_sleep(5) stopped');
    assert.ok(Date.now() - t0 < 3000);
    await running;
    await eventually(async () => (await tenant(p, 'acme')).backends_in_use === 0, 2000, 'acme backends_in_use back to 0');
    // and the pool keeps serving
    const d = await p.connect('acme.appuser', 'shared_db');
    assert.equal((await d.query<{ n: string }>('SELECT count(*) AS n FROM orders')).rows[0]!.n, '3');
    await d.end();
  });

  test('killed mid-transaction while a query runs: nothing committed, nothing left running', T, async () => {
    const c = new pg.Client(p.clientConfig('acme.appuser', 'shared_db'));
    c.on('error', () => {});
    await c.connect();
    await c.query('BEGIN');
    await c.query("INSERT INTO pool_scratch VALUES (2, 'killed during a query')");
    const running = c.query('SELECT pg_sleep(5)').catch(() => undefined);
    await eventually(async () => (await count("state = 'active' AND query = 'SELECT pg_sleep(5)'")) === 1, 2000, 'pg_sleep(5) running');
    c.connection.stream.destroy();
    await eventually(async () => (await count("state <> 'idle'")) === 0, 3000, 'no busy appuser backend');
    await running;
    const rows = await direct<{ n: string }>('SELECT count(*) AS n FROM acme.pool_scratch', 'shared_db');
    assert.equal(rows[0]!.n, '0');
  });
});

describe('maintenance', () => {
  test('min_idle / min_connections: after one acme login the shared pool warms to >= 2 connections within 3 s', T, async () => {
    await noAppuserBackends();
    const p = await startProxy({ admin: true });
    try {
      const c = await p.connect('acme.appuser', 'shared_db');
      await eventually(async () => {
        const s = await pool(p, SHARED);
        return s !== undefined && s.idle + s.active >= 2;
      }, 3000, 'the shared pool to hold 2 connections');
      assert.ok((await count('true')) >= 2);
      // widgetco's dedicated pool warms to its own min_idle (1)
      const w = await p.connect('widgetco.appuser', 'widgetco_db');
      await eventually(async () => {
        const s = await pool(p, WIDGETCO);
        return s !== undefined && s.idle + s.active >= 1;
      }, 3000, 'the widgetco pool to hold 1 connection');
      await c.end();
      await w.end();
    } finally {
      await closeProxy(p);
    }
  });

  test('closing the proxy while warm-up connections are being opened leaves no backend behind', T, async () => {
    await noAppuserBackends();
    const p = await startProxy({
      patch: (c) => {
        c.pool.min_connections = 5;
      },
    });
    let caught = false;
    try {
      await learnPassword(p);
      // Wait for the maintenance tick that starts opening the min_connections warm-up connections.
      const until = Date.now() + 3000;
      while (Date.now() < until && !caught) {
        caught = p.proxy.ctx.pools.all().some((x) => x.stats().connecting > 0);
        if (!caught) await new Promise((r) => setImmediate(r));
      }
      assert.ok(caught, 'saw warm-up connections being opened');
    } finally {
      await p.close();
    }
    await sleep(1000);
    const left = await monitor.query<{ pid: number; backend_start: Date }>("SELECT pid, backend_start FROM pg_stat_activity WHERE usename = 'appuser'");
    if (left.rows.length > 0) {
      await monitor.query('SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p', [left.rows.map((r) => r.pid)]);
    }
    assert.equal(left.rows.length, 0, `backends still open 1 s after proxy.close(): ${JSON.stringify(left.rows)}`);
  });

  test('idle_timeout_secs = 1: after a burst of 5 clients the idle backends close down to 0 within 4 s', T, async () => {
    await noAppuserBackends();
    const p = await startProxy({
      admin: true,
      patch: (c) => {
        c.pool.idle_timeout_secs = 1;
        c.pool.min_connections = 0;
        tenantCfg(c, 'acme').pool.min_idle = 0;
      },
    });
    const cs: pg.Client[] = [];
    try {
      cs.push(...(await connectMany(p, 'acme.appuser', 'shared_db', 5)));
      await Promise.all(cs.map(async (c) => {
        await c.query('BEGIN');
        await c.query('SELECT pg_sleep(0.2)');
        await c.query('COMMIT');
      }));
      const after = await pool(p, SHARED);
      assert.ok(after !== undefined && after.idle + after.active >= 5, `the burst opened 5 backends: ${JSON.stringify(after)}`);
      const t0 = Date.now();
      await eventually(async () => {
        const s = await pool(p, SHARED);
        return s !== undefined && s.idle + s.active + s.connecting === 0 && (await count('true')) === 0;
      }, 4000, 'the idle backends to be closed');
      const took = Date.now() - t0;
      assert.ok(took < 4000, `took ${took} ms`);
      // the clients are still connected and get a fresh backend when they need one
      assert.equal((await cs[0]!.query<{ n: string }>('SELECT count(*) AS n FROM orders')).rows[0]!.n, '3');
    } finally {
      await endAll(cs);
      await closeProxy(p);
    }
  });

  test('max_lifetime_secs = 1: a backend older than 1 s is not reused', T, async () => {
    await noAppuserBackends();
    const p = await startProxy({
      patch: (c) => {
        c.pool.max_lifetime_secs = 1;
        c.pool.min_connections = 0;
        tenantCfg(c, 'acme').pool.min_idle = 0;
      },
    });
    const c = new pg.Client(p.clientConfig('acme.appuser', 'shared_db'));
    c.on('error', () => {});
    // pg_stat_activity is a system catalog acme may not read (allow_system_access = false): the superuser
    // monitor records when each appuser backend started, sampling often enough to see every one of them
    // (a backend lives at least through its login, and is only closed for age after more than 1 s).
    const started = new Map<number, number>();
    const recordStarts = async (): Promise<number> => {
      const r = await monitor.query<{ pid: number; s: string }>("SELECT pid, extract(epoch FROM backend_start) AS s FROM pg_stat_activity WHERE usename = 'appuser'");
      for (const row of r.rows) started.set(row.pid, Number(row.s));
      return r.rows.length;
    };
    const watch = sampler(recordStarts, 10);
    try {
      await c.connect();
      /** Which backend ran a statement, and how old it was when the statement ran (clock_timestamp on the backend). */
      const probe = async (): Promise<{ pid: number; age: number }> => {
        const r = await c.query<{ pid: number; at: string }>('SELECT pg_backend_pid() AS pid, extract(epoch FROM clock_timestamp()) AS at');
        const pid = r.rows[0]!.pid;
        if (!started.has(pid)) await recordStarts();
        const start = started.get(pid);
        assert.ok(start !== undefined, `the monitor saw backend ${pid} start`);
        return { pid, age: Number(r.rows[0]!.at) - start };
      };
      const first = await probe();
      const second = await probe();
      await sleep(1300);
      const third = await probe();
      // Across a few more seconds no statement may run on a backend older than max_lifetime_secs
      // (a little slack for the login round trips between fork and the proxy's clock starting).
      const later: { pid: number; age: number }[] = [];
      for (let i = 0; i < 7; i++) {
        await sleep(450);
        later.push(await probe());
      }
      assert.equal(second.pid, first.pid, 'a young backend is reused');
      assert.notEqual(third.pid, first.pid, `after 1.3 s idle the old backend is not reused (it was ${third.age.toFixed(2)} s old)`);
      const tooOld = [first, second, third, ...later].filter((x) => x.age > 1.15);
      assert.deepEqual(tooOld, [], `statements ran on backends older than 1 s: ${JSON.stringify(tooOld)}`);
      assert.ok(new Set([first, third, ...later].map((x) => x.pid)).size >= 3);
    } finally {
      await watch.stop();
      await endAll([c]);
      await closeProxy(p);
    }
  });
});
