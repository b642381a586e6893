// Session state never crosses tenants. Two schema tenants (acme and the scenario's newclient) share ONE
// backend connection: the shared pool is capped at 1, so every checkout by one tenant reuses the backend the
// other just left. Whatever one tenant leaves on that backend (GUCs, temp tables, prepared statements,
// cursors, LISTEN, advisory locks, sequence state, search_path) must be gone before the other runs a
// statement on it. Also: search_path comes back after a client resets it (session and transaction mode),
// and a session-mode backend is reset before its next client.
//
// Since the guardrails are enforced, a schema tenant cannot even try most escapes (SET search_path to another
// tenant's schema, set_config('search_path', …)): those tests assert the refusal (42501, naming the tenant)
// and keep their pooling guarantee with an allowed variant. Tests that need LISTEN or read the session-local
// views only a session can see about itself (pg_settings, pg_prepared_statements, pg_cursors, pg_locks of its
// own pid, its temp schema) run their proxy with guardrails: false: schema isolation still holds there.
// State that lives on one backend (temp table, LISTEN, WITH HOLD cursor, session advisory lock, SQL PREPARE)
// pins its client to the backend in transaction mode: the other tenant waits until that client leaves, and
// then gets the backend reset.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import postgres from 'postgres';
import type { Config } from '../src/config/schema.js';
import { direct, eventually, newclientTenantToml, pgError, startProxy, type ProxyOptions, type TestProxy } from './helpers/proxy.js';

/** The "Adding a New Tenant" block of the scenario document: a second schema tenant in shared_db. */
const withNewclient = (text: string): string => text + newclientTenantToml();

const ACME_ORDERS = ['acme-customer-1', 'acme-customer-2', 'acme-customer-3'];
const NEWCLIENT_ORDERS = ['newclient-customer-1', 'newclient-customer-2'];

/** The shared pool limited to a single backend, so both tenants are served by the same one. */
function oneSharedBackend(mode: 'session' | 'transaction', guardrails = true): ProxyOptions {
  return {
    toml: withNewclient,
    mode,
    guardrails,
    admin: true,
    patch: (c: Config) => {
      c.pool.max_connections = 1;
      c.pool.min_connections = 0;
      c.pool_mode.max_pool_size = 1;
    },
  };
}

async function one(c: pg.Client, sql: string): Promise<string | null> {
  const r = await c.query<Record<string, unknown>>(sql);
  const row = r.rows[0];
  if (row === undefined) return null;
  const v = Object.values(row)[0];
  return v === null || v === undefined ? null : String(v);
}


/** The statement is refused by the proxy: 42501, a message naming the tenant (and `what`, when given). */
async function refused(p: Promise<unknown>, tenant: string, what?: RegExp): Promise<void> {
  const err = await pgError(p);
  assert.equal(err.code, '42501', err.message);
  assert.match(err.message, new RegExp(`tenant "${tenant}"`));
  if (what !== undefined) assert.match(err.message, what);
}

async function customers(c: pg.Client): Promise<string[]> {
  return (await c.query<{ customer: string }>('SELECT customer FROM orders ORDER BY id')).rows.map((r) => r.customer);
}

/** Waits until no backend of a closed proxy lingers (each describe counts its own). */
async function noAppuserBackends(ms = 5000): Promise<void> {
  await eventually(async () => {
    const rows = await direct<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE usename = 'appuser'");
    return rows[0]!.n === '0';
  }, ms, 'appuser backends of earlier proxies to go away');
}

/**
 * Closes a test proxy. ProxyServer.close() waits for every client socket to close before it ends any
 * session, so a client left behind by a failed test would hang the file: end the sessions ourselves then.
 */
async function closeProxy(p: TestProxy | undefined): Promise<void> {
  if (p === undefined) return;
  const closed = p.close();
  const done = await Promise.race([closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3000))]);
  if (!done) {
    for (const s of [...p.proxy.ctx.sessions]) s.socket.destroy();
    await closed;
  }
  // A backend connection left behind would hold this process open and spoil the next describe.
  try {
    await noAppuserBackends(2000);
  } catch {
    const pids = (await direct<{ pid: number }>("SELECT pid FROM pg_stat_activity WHERE usename = 'appuser'")).map((r) => r.pid);
    await direct('SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p', 'postgres', [pids]);
    console.log(`# closeProxy: terminated ${pids.length} appuser backend(s) still open after proxy.close()`);
  }
}

let defaultWorkMem = '';
const T = { timeout: 20_000 };

/** Settings changed by SET in the current session (search_path is the proxy's own). */
const SESSION_GUCS = "SELECT coalesce(string_agg(name || '=' || setting, ', ' ORDER BY name), '') FROM pg_settings WHERE source = 'session' AND name <> 'search_path'";

before(async () => {
  // Test files run one after another: an appuser backend still open now was left behind by an earlier
  // file's proxy. Clear it so this file's backend-pid checks are its own.
  try {
    await noAppuserBackends(3000);
  } catch {
    const pids = (await direct<{ pid: number }>("SELECT pid FROM pg_stat_activity WHERE usename = 'appuser'")).map((r) => r.pid);
    await direct('SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p', 'postgres', [pids]);
    console.log(`# isolation.test.ts: terminated ${pids.length} appuser backend(s) left open by an earlier test file`);
  }
  defaultWorkMem = (await direct<{ work_mem: string }>('SHOW work_mem', 'shared_db'))[0]!.work_mem;
  assert.notEqual(defaultWorkMem, '7MB');
  // A non-temporary sequence both tenants may use: currval/lastval are session state (DISCARD SEQUENCES).
  await direct('DROP SEQUENCE IF EXISTS public.iso_scratch_seq; CREATE SEQUENCE public.iso_scratch_seq; GRANT USAGE, SELECT ON SEQUENCE public.iso_scratch_seq TO appuser', 'shared_db');
});
after(async () => {
  await direct('DROP SEQUENCE IF EXISTS public.iso_scratch_seq', 'shared_db');
});

describe('session state never crosses tenants (transaction mode, one shared backend)', () => {
  let p: TestProxy;
  let a: pg.Client; // acme
  let b: pg.Client; // newclient
  let seq = 0;
  const uniq = (base: string): string => `${base}_${++seq}`;

  /**
   * Runs `setup` on a new acme client whose session state pins it to the one backend. While it stays,
   * newclient's next statement waits (the pinned backend is never shared); once it leaves, newclient gets
   * that very backend, reset. `b` is then on it and the caller checks that nothing of acme's is left.
   */
  async function pinnedAcmeThenNewclient(setup: (c: pg.Client) => Promise<void>): Promise<void> {
    const a2 = await p.connect('acme.appuser', 'shared_db');
    a2.on('error', () => {});
    let waiting: Promise<string | null> | undefined;
    try {
      await setup(a2);
      const pid = await one(a2, 'SELECT pg_backend_pid()');
      let served = false;
      waiting = one(b, 'SELECT pg_backend_pid()').then((v) => {
        served = true;
        return v;
      });
      await sleep(300);
      assert.equal(served, false, 'newclient must wait while the backend is pinned to the acme client');
      await a2.end();
      assert.equal(await waiting, pid, 'newclient then gets the backend the acme client left');
    } finally {
      await a2.end().catch(() => undefined);
      await waiting?.catch(() => undefined);
    }
  }

  before(async () => {
    // guardrails: false: LISTEN and the session-local views (pg_settings, pg_prepared_statements, pg_cursors,
    // pg_locks of the session's own pid, its temp schema) are what these tests look at. Isolation still holds.
    p = await startProxy(oneSharedBackend('transaction', false));
    a = await p.connect('acme.appuser', 'shared_db');
    b = await p.connect('newclient.appuser', 'shared_db');
    a.on('error', () => {});
    b.on('error', () => {});
  });
  after(async () => {
    await a?.end().catch(() => undefined);
    await b?.end().catch(() => undefined);
    await closeProxy(p);
  });

  test('both tenants are served by the same backend pid, each with its own search_path', T, async () => {
    const pidA = await one(a, 'SELECT pg_backend_pid()');
    const pidB = await one(b, 'SELECT pg_backend_pid()');
    const pidA2 = await one(a, 'SELECT pg_backend_pid()');
    assert.ok(pidA !== null && Number(pidA) > 0);
    assert.equal(pidB, pidA, 'the shared pool has one backend: newclient must reuse acme\'s');
    assert.equal(pidA2, pidA);
    assert.equal(await one(a, 'SHOW search_path'), 'acme, public');
    assert.equal(await one(b, 'SHOW search_path'), 'newclient, public');
    const res = await fetch(`http://127.0.0.1:${p.adminPort}/pools`);
    const body = (await res.json()) as { pools: { name: string; idle: number; active: number }[] };
    const shared = body.pools.filter((x) => x.name.startsWith('shared/'));
    assert.deepEqual(shared.map((x) => x.name), ['shared/shared_db/appuser'], 'acme and newclient draw from one shared pool');
    assert.ok(shared[0]!.idle + shared[0]!.active <= 1);
  });

  test('SET work_mem outside a transaction: the other tenant sees the default', T, async () => {
    await a.query("SET work_mem = '7MB'");
    assert.equal(await one(a, 'SHOW work_mem'), '7MB', 'same tenant, same backend: the SET is still there');
    assert.equal(await one(b, 'SHOW work_mem'), defaultWorkMem);
    // and the other way round: acme keeps its own value (a session-level SET follows its client), never newclient's
    await b.query("SET work_mem = '9MB'");
    assert.equal(await one(a, 'SHOW work_mem'), '7MB');
    assert.equal(await one(b, 'SHOW work_mem'), '9MB');
    await a.query('RESET work_mem');
    await b.query('RESET work_mem');
    assert.equal(await one(a, 'SHOW work_mem'), defaultWorkMem);
    assert.equal(await one(b, 'SHOW work_mem'), defaultWorkMem);
  });

  test('a TEMP table of one tenant is invisible to the other', T, async () => {
    const t = uniq('iso_tmp');
    await pinnedAcmeThenNewclient(async (a2) => {
      await a2.query(`CREATE TEMP TABLE ${t} (v text)`);
      await a2.query(`INSERT INTO ${t} VALUES ('acme-secret')`);
      assert.equal(await one(a2, `SELECT v FROM pg_temp.${t}`), 'acme-secret');
    });
    assert.equal(await one(b, `SELECT to_regclass('pg_temp.${t}')::text`), null);
    const err = await pgError(b.query(`SELECT v FROM pg_temp.${t}`));
    assert.equal(err.code, '42P01');
    assert.equal(await one(b, "SELECT count(*) FROM pg_class WHERE relpersistence = 't' AND relnamespace = pg_my_temp_schema()"), '0');
  });

  test('a protocol-level named prepared statement of one tenant is not usable by the other', T, async () => {
    const name = uniq('iso_stmt');
    const sqlText = `SELECT $1::text || '-${name}' AS v`;
    const r = await a.query<{ v: string }>({ name, text: sqlText, values: ['acme'] });
    assert.equal(r.rows[0]!.v, `acme-${name}`);
    const onBackend = await a.query<{ name: string }>('SELECT name FROM pg_prepared_statements WHERE statement = $1', [sqlText]);
    assert.equal(onBackend.rows.length, 1, 'acme\'s statement is prepared on the backend');
    const serverName = onBackend.rows[0]!.name;

    assert.equal(await one(b, 'SELECT count(*) FROM pg_prepared_statements'), '0', 'newclient sees none of acme\'s prepared statements');
    const err = await pgError(b.query(`EXECUTE ${pg.escapeIdentifier(serverName)}('newclient')`));
    assert.equal(err.code, '26000');

    // acme keeps using its statement: the proxy prepares it again on the reset backend
    const again = await a.query<{ v: string }>({ name, text: sqlText, values: ['acme2'] });
    assert.equal(again.rows[0]!.v, `acme2-${name}`);
  });

  test('LISTEN by one tenant: the other is listening on nothing and gets no notification', T, async () => {
    const chan = uniq('iso_chan');
    await pinnedAcmeThenNewclient(async (a2) => {
      await a2.query(`LISTEN ${chan}`);
      assert.equal(await one(a2, 'SELECT string_agg(c, \',\') FROM pg_listening_channels() c'), chan);
    });
    const got: string[] = [];
    const onNotification = (n: pg.Notification): void => {
      got.push(n.channel);
    };
    b.on('notification', onNotification);
    try {
      assert.equal(await one(b, 'SELECT count(*) FROM pg_listening_channels()'), '0');
      // B holds the backend inside a transaction while a third client notifies: nothing must arrive at B.
      await b.query('BEGIN');
      await direct(`NOTIFY ${chan}, 'for acme only'`, 'shared_db');
      await b.query('SELECT pg_sleep(0.1)');
      await b.query('COMMIT');
      assert.deepEqual(got, []);
    } finally {
      b.off('notification', onNotification);
    }
  });

  test('a session advisory lock of one tenant is not held in the other\'s session', T, async () => {
    const key = 4242 + seq++;
    await pinnedAcmeThenNewclient(async (a2) => {
      assert.equal(await one(a2, `SELECT pg_advisory_lock(${key})`), '');
      const held = await direct<{ n: string }>(`SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = ${key}`, 'shared_db');
      assert.equal(held[0]!.n, '1', 'acme holds the lock on the backend');
    });
    assert.equal(await one(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"), '0');
    // newclient must be able to take and release the same key itself (a client of its own: a session lock
    // pins it), and the lock must be gone from the cluster.
    const b2 = await p.connect('newclient.appuser', 'shared_db');
    try {
      assert.equal(await one(b2, `SELECT pg_try_advisory_lock(${key})`), 'true');
      assert.equal(await one(b2, `SELECT pg_advisory_unlock(${key})`), 'true');
    } finally {
      await b2.end();
    }
    const left = await direct<{ n: string }>(`SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = ${key}`, 'shared_db');
    assert.equal(left[0]!.n, '0');
  });

  test('other session settings (TimeZone, application_name, statement_timeout, READ ONLY) stay with their tenant', T, async () => {
    const baseline = await one(b, SESSION_GUCS);
    await a.query("SET TimeZone = 'Asia/Tokyo'");
    await a.query("SET application_name = 'acme-secret'");
    await a.query("SET statement_timeout = '1234ms'");
    await a.query('SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY');
    assert.equal(await one(a, 'SHOW TimeZone'), 'Asia/Tokyo');
    assert.equal(await one(a, 'SHOW default_transaction_read_only'), 'on');
    assert.equal(await one(b, SESSION_GUCS), baseline, 'newclient\'s session-level settings are exactly its own');
    assert.notEqual(await one(b, 'SHOW TimeZone'), 'Asia/Tokyo');
    assert.notEqual(await one(b, 'SHOW application_name'), 'acme-secret');
    assert.equal(await one(b, 'SHOW default_transaction_read_only'), 'off');
    // settings acme made follow acme to its next checkout, or are gone: never an error for newclient
    await a.query('SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE');
    await a.query('RESET statement_timeout');
    await a.query('RESET TimeZone');
    await a.query('RESET application_name');
  });

  test('a WITH HOLD cursor of one tenant is closed before the other runs', T, async () => {
    const cur = uniq('iso_cur');
    await pinnedAcmeThenNewclient(async (a2) => {
      await a2.query(`DECLARE ${cur} CURSOR WITH HOLD FOR SELECT customer FROM orders ORDER BY id`);
      assert.equal(await one(a2, `FETCH 1 FROM ${cur}`), 'acme-customer-1');
    });
    assert.equal(await one(b, 'SELECT count(*) FROM pg_cursors'), '0');
    const err = await pgError(b.query(`FETCH 1 FROM ${cur}`));
    assert.equal(err.code, '34000');
  });

  test('a SQL-level PREPARE of one tenant cannot be EXECUTEd by the other (it would read acme.orders)', T, async () => {
    const name = uniq('iso_sqlprep');
    await pinnedAcmeThenNewclient(async (a2) => {
      await a2.query(`PREPARE ${name} AS SELECT customer FROM orders ORDER BY id LIMIT 1`);
      assert.equal(await one(a2, `EXECUTE ${name}`), 'acme-customer-1');
    });
    const err = await pgError(b.query(`EXECUTE ${name}`));
    assert.equal(err.code, '26000');
  });

  test('sequence session state (currval, lastval) does not cross', T, async () => {
    await a.query("SELECT nextval('public.iso_scratch_seq')");
    assert.ok(Number(await one(a, "SELECT currval('public.iso_scratch_seq')")) > 0);
    const err = await pgError(b.query("SELECT currval('public.iso_scratch_seq')"));
    assert.equal(err.code, '55000');
    const err2 = await pgError(b.query('SELECT lastval()'));
    assert.equal(err2.code, '55000');
  });

  test('SET search_path by one tenant: the other always gets its own', T, async () => {
    // Pointing search_path at the other tenant's schema is refused at the proxy, and changes nothing.
    await refused(a.query('SET search_path TO newclient'), 'acme', /"newclient"/);
    assert.equal(await one(a, 'SHOW search_path'), 'acme, public');
    await refused(b.query('SET search_path TO acme'), 'newclient', /"acme"/);
    assert.equal(await one(b, 'SHOW search_path'), 'newclient, public');
    // What a tenant may set (its own schemas, public) still never reaches the other on the shared backend.
    await a.query('SET search_path TO public');
    assert.equal(await one(b, 'SHOW search_path'), 'newclient, public');
    assert.deepEqual(await customers(b), NEWCLIENT_ORDERS);
    await b.query('SET search_path TO newclient');
    assert.equal(await one(a, 'SHOW search_path'), 'acme, public');
    assert.deepEqual(await customers(a), ACME_ORDERS);
    await a.query('SET search_path TO public');
    assert.deepEqual(await customers(b), NEWCLIENT_ORDERS);
    assert.deepEqual(await customers(a), ACME_ORDERS);
  });

  // The proxy re-applies search_path after statements that change or may change it. Whatever else the tenant
  // set before such a statement must still not reach the other tenant: state that stays on the backend at the
  // tenant switch (settings, protocol-level prepared statements, sequence state) set by a client that stays,
  // and state that pins (temp table, WITH HOLD cursor, SQL PREPARE, LISTEN, advisory lock) set by a client
  // that then leaves. 'SET search_path TO newclient' is refused now: the refusal must not change that either.
  for (const [label, trigger, refusedAs] of [
    ['RESET search_path', 'RESET search_path', null],
    ['SET search_path TO public', 'SET search_path TO public', null],
    ['SET search_path TO newclient (refused)', 'SET search_path TO newclient', /"newclient"/],
    ["a query that merely mentions 'role'", 'SELECT 1 AS role', null],
  ] as const) {
    test(`state set before ${label} still does not reach the other tenant`, T, async () => {
      const t = uniq('iso_tmp');
      const name = uniq('iso_stmt');
      const chan = uniq('iso_chan');
      const key = 4242 + seq++;
      const cur = uniq('iso_cur');
      const sqlPrep = uniq('iso_sqlprep');
      const stmt = `SELECT $1::text || '-${name}' AS v`;
      const runTrigger = async (c: pg.Client): Promise<void> => {
        if (refusedAs === null) await c.query(trigger);
        else await refused(c.query(trigger), 'acme', refusedAs);
      };
      const baseline = await one(b, SESSION_GUCS);
      await pinnedAcmeThenNewclient(async (a2) => {
        await a2.query(`DECLARE ${cur} CURSOR WITH HOLD FOR SELECT 1`);
        await a2.query(`PREPARE ${sqlPrep} AS SELECT customer FROM orders`);
        await a2.query(`CREATE TEMP TABLE ${t} (v text)`);
        await a2.query(`LISTEN ${chan}`);
        await a2.query(`SELECT pg_advisory_lock(${key})`);
        await a2.query("SET work_mem = '7MB'");
        await runTrigger(a2);
      });
      await a.query("SET work_mem = '7MB'");
      await a.query("SET TimeZone = 'Asia/Tokyo'");
      await a.query("SELECT nextval('public.iso_scratch_seq')");
      await a.query({ name, text: stmt, values: ['acme'] });
      await runTrigger(a);

      const leaks: string[] = [];
      const workMem = await one(b, 'SHOW work_mem');
      if (workMem !== defaultWorkMem) leaks.push(`work_mem = ${workMem}`);
      if ((await one(b, `SELECT to_regclass('pg_temp.${t}')::text`)) !== null) leaks.push(`temp table ${t}`);
      const prepared = await one(b, "SELECT string_agg(statement, ' | ') FROM pg_prepared_statements");
      if (prepared !== null) leaks.push(`prepared statements: ${prepared}`);
      const listening = await one(b, "SELECT string_agg(c, ',') FROM pg_listening_channels() c");
      if (listening !== null) leaks.push(`LISTEN ${listening}`);
      const locks = await one(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()");
      if (locks !== '0') leaks.push(`${locks} advisory lock(s)`);
      const gucs = await one(b, SESSION_GUCS);
      if (gucs !== baseline) leaks.push(`session settings: ${gucs}`);
      const cursors = await one(b, "SELECT string_agg(name, ',') FROM pg_cursors");
      if (cursors !== null) leaks.push(`cursors ${cursors}`);
      if ((await one(b, "SELECT count(*) FROM pg_prepared_statements WHERE from_sql")) !== '0') leaks.push(`SQL PREPARE ${sqlPrep}`);
      const cur2 = await b.query("SELECT currval('public.iso_scratch_seq')").then(() => 'defined', () => 'undefined');
      if (cur2 !== 'undefined') leaks.push('currval(iso_scratch_seq)');
      const sp = await one(b, 'SHOW search_path');
      if (sp !== 'newclient, public') leaks.push(`search_path = ${sp}`);
      assert.deepEqual(leaks, [], `acme's session state reached newclient's checkout after acme ran "${trigger}"`);
      await a.query('RESET work_mem; RESET TimeZone');
    });
  }

  test('a tenant switch never leaves an advisory lock held anywhere', T, async () => {
    // Whatever the tests above did, the one backend now serves newclient; acme's locks must be gone.
    await one(b, 'SELECT 1');
    const rows = await direct<{ n: string }>("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'", 'shared_db');
    assert.equal(rows[0]!.n, '0');
  });
});

describe('cross-tenant reads through unqualified names', () => {
  let p: TestProxy;
  let a: pg.Client;
  let b: pg.Client;
  let sa: postgres.Sql;
  let sb: postgres.Sql;

  before(async () => {
    await noAppuserBackends();
    p = await startProxy(oneSharedBackend('transaction'));
    a = await p.connect('acme.appuser', 'shared_db');
    b = await p.connect('newclient.appuser', 'shared_db');
    const pjs = (user: string): postgres.Sql =>
      postgres({ host: '127.0.0.1', port: p.port, user, password: 'apppass', database: 'shared_db', max: 1, onnotice: () => {} });
    sa = pjs('acme.appuser');
    sb = pjs('newclient.appuser');
  });
  after(async () => {
    await sa?.end({ timeout: 1 });
    await sb?.end({ timeout: 1 });
    await a?.end().catch(() => undefined);
    await b?.end().catch(() => undefined);
    await closeProxy(p);
  });

  test('acme sees only acme rows, newclient only newclient rows (node-postgres, interleaved on one backend)', T, async () => {
    for (let i = 0; i < 5; i++) {
      assert.deepEqual(await customers(a), ACME_ORDERS);
      assert.deepEqual(await customers(b), NEWCLIENT_ORDERS);
    }
    const products = async (c: pg.Client): Promise<string[]> => (await c.query<{ name: string }>('SELECT name FROM products ORDER BY id')).rows.map((r) => r.name);
    assert.deepEqual(await products(a), ['acme-widget', 'acme-gadget']);
    assert.deepEqual(await products(b), ['newclient-thing']);
    assert.equal(await one(a, 'SELECT current_schema()'), 'acme');
    assert.equal(await one(b, 'SELECT current_schema()'), 'newclient');
  });

  test('the same with postgres.js (named prepared statements, identical SQL text for both tenants)', T, async () => {
    for (let i = 0; i < 3; i++) {
      const [ra, rb] = await Promise.all([
        sa<{ customer: string }[]>`SELECT customer FROM orders WHERE id > ${0} ORDER BY id`,
        sb<{ customer: string }[]>`SELECT customer FROM orders WHERE id > ${0} ORDER BY id`,
      ]);
      assert.deepEqual(ra.map((r) => r.customer), ACME_ORDERS);
      assert.deepEqual(rb.map((r) => r.customer), NEWCLIENT_ORDERS);
    }
    const [pa] = await sa<{ pid: number }[]>`SELECT pg_backend_pid() AS pid`;
    const [pb] = await sb<{ pid: number }[]>`SELECT pg_backend_pid() AS pid`;
    assert.equal(pa!.pid, pb!.pid, 'both tenants still share the one backend');
  });

  test('another acme client on the same backend still reads acme rows after one acme client changed search_path', T, async () => {
    const a2 = await p.connect('acme.appuser', 'shared_db');
    try {
      // Escapes to the other tenant's schema are refused at the proxy; the session stays on acme, public.
      for (const stmt of ['SET search_path TO newclient', 'SET "search_path" TO newclient', "SELECT set_config('search_path', 'newclient', false)"]) {
        await refused(a.query(stmt), 'acme', /"newclient"/);
        assert.equal(await one(a, 'SHOW search_path'), 'acme, public', `${stmt} was refused and changed nothing`);
        assert.deepEqual(await customers(a2), ACME_ORDERS, `after the other acme client's refused ${stmt}`);
        assert.equal(await one(a2, 'SHOW search_path'), 'acme, public');
      }
      // Changes acme may make (to its own schemas) still never reach another client on the same backend.
      for (const stmt of ['SET search_path TO public', 'SET "search_path" TO acme', 'SET search_path = pg_temp, public']) {
        await a.query(stmt);
        assert.deepEqual(await customers(a2), ACME_ORDERS, `after the other acme client ran ${stmt}`);
        assert.equal(await one(a2, 'SHOW search_path'), 'acme, public');
      }
    } finally {
      await a2.end();
      await a.query('RESET search_path'); // a form the proxy recognises: later tests start from acme, public
    }
  });

  test('mixed drivers, concurrently: every answer carries its own tenant\'s rows', T, async () => {
    const work: Promise<void>[] = [];
    for (let i = 0; i < 10; i++) {
      work.push(customers(a).then((r) => assert.deepEqual(r, ACME_ORDERS)));
      work.push(sb<{ customer: string }[]>`SELECT customer FROM orders ORDER BY id`.then((r) => assert.deepEqual(r.map((x) => x.customer), NEWCLIENT_ORDERS)));
      work.push(customers(b).then((r) => assert.deepEqual(r, NEWCLIENT_ORDERS)));
      work.push(sa<{ customer: string }[]>`SELECT customer FROM orders ORDER BY id`.then((r) => assert.deepEqual(r.map((x) => x.customer), ACME_ORDERS)));
    }
    await Promise.all(work);
  });
});

for (const mode of ['session', 'transaction'] as const) {
  describe(`search_path returns to the tenant's after the client resets it (${mode} mode)`, () => {
    let p: TestProxy;
    /** The same, without rate_limits and permissions: set_config() needs allow_system_access, which acme lacks. */
    let open: TestProxy;
    let a: pg.Client;
    let sa: postgres.Sql;

    before(async () => {
      await noAppuserBackends();
      p = await startProxy({ toml: withNewclient, mode });
      open = await startProxy({ toml: withNewclient, mode, guardrails: false });
      a = await p.connect('acme.appuser', 'shared_db');
      sa = postgres({ host: '127.0.0.1', port: p.port, user: 'acme.appuser', password: 'apppass', database: 'shared_db', max: 1, onnotice: () => {} });
    });
    after(async () => {
      await sa?.end({ timeout: 1 });
      await a?.end().catch(() => undefined);
      await open?.close();
      await closeProxy(p);
    });

    for (const stmt of [
      'DISCARD ALL',
      'RESET ALL',
      'RESET search_path',
      'SET search_path TO DEFAULT',
      'discard all',
      'RESET\n  search_path',
      'RESET "search_path"',
    ]) {
      test(`after ${JSON.stringify(stmt)} (simple protocol) the next statement sees acme, public`, T, async () => {
        await a.query(stmt);
        assert.equal(await one(a, 'SHOW search_path'), 'acme, public');
        assert.deepEqual(await customers(a), ACME_ORDERS);
      });
    }

    test('after "SELECT set_config(\'search_path\', \'public\', false)" the next statement sees acme, public (refused under acme\'s permissions)', T, async () => {
      const stmt = "SELECT set_config('search_path', 'public', false)";
      // The reference config: set_config() is an admin function (allow_system_access = false).
      await refused(a.query(stmt), 'acme', /set_config/);
      assert.equal(await one(a, 'SHOW search_path'), 'acme, public');
      assert.deepEqual(await customers(a), ACME_ORDERS);
      // Without permissions it runs (public is one of acme's schemas), and the proxy brings acme back.
      const c = await open.connect('acme.appuser', 'shared_db');
      try {
        assert.equal(await one(c, stmt), 'public');
        assert.equal(await one(c, 'SHOW search_path'), 'acme, public');
        assert.deepEqual(await customers(c), ACME_ORDERS);
        // Isolation holds whatever the permissions say: another tenant's schema stays refused.
        await refused(c.query("SELECT set_config('search_path', 'newclient', false)"), 'acme', /"newclient"/);
        assert.deepEqual(await customers(c), ACME_ORDERS);
      } finally {
        await c.end();
      }
    });

    for (const stmt of ['RESET ALL', 'RESET search_path']) {
      test(`after ${stmt} (extended protocol, postgres.js) the next statement sees acme, public`, T, async () => {
        await sa.unsafe(stmt);
        const [r] = await sa<{ search_path: string }[]>`SELECT current_setting('search_path') AS search_path`;
        assert.equal(r!.search_path, 'acme, public');
        const rows = await sa<{ customer: string }[]>`SELECT customer FROM orders ORDER BY id`;
        assert.deepEqual(rows.map((x) => x.customer), ACME_ORDERS);
      });
    }
  });
}

describe('session mode: a backend is reset before the next client of the same tenant gets it', () => {
  let p: TestProxy;
  before(async () => {
    await noAppuserBackends();
    // guardrails: false: LISTEN and pg_locks (a system catalog) are part of what is checked.
    p = await startProxy(oneSharedBackend('session', false));
  });
  after(async () => {
    await closeProxy(p);
  });

  test('SET work_mem, TEMP table, LISTEN and advisory lock of client 1 are gone for client 2', T, async () => {
    // Session mode: a client that is still connected holds the only backend, so a failure here must not
    // leave c1 behind (the next test would wait acquire_timeout_secs for the backend).
    const c1 = await p.connect('acme.appuser', 'shared_db');
    let pid1: string | null;
    try {
      pid1 = await one(c1, 'SELECT pg_backend_pid()');
      await c1.query("SET work_mem = '7MB'");
      await c1.query('CREATE TEMP TABLE iso_session_tmp (v int)');
      await c1.query('LISTEN iso_session_chan');
      await c1.query('SELECT pg_advisory_lock(777)');
      assert.equal(await one(c1, 'SHOW work_mem'), '7MB');
    } finally {
      await c1.end();
    }

    const c2 = await p.connect('acme.appuser', 'shared_db');
    try {
      assert.equal(await one(c2, 'SELECT pg_backend_pid()'), pid1, 'pool size 1: client 2 gets client 1\'s backend');
      assert.equal(await one(c2, 'SHOW work_mem'), defaultWorkMem);
      assert.equal(await one(c2, "SELECT to_regclass('pg_temp.iso_session_tmp')::text"), null);
      assert.equal(await one(c2, 'SELECT count(*) FROM pg_listening_channels()'), '0');
      assert.equal(await one(c2, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"), '0');
      assert.equal(await one(c2, 'SHOW search_path'), 'acme, public');
      assert.deepEqual(await customers(c2), ACME_ORDERS);
    } finally {
      await c2.end();
    }
  });

  test('the next client of the OTHER tenant gets a reset backend with its own search_path', T, async () => {
    const c1 = await p.connect('acme.appuser', 'shared_db');
    let pid1: string | null;
    try {
      pid1 = await one(c1, 'SELECT pg_backend_pid()');
      await c1.query("SET work_mem = '7MB'");
      await c1.query('SET search_path TO acme');
    } finally {
      await c1.end();
    }
    const c2 = await p.connect('newclient.appuser', 'shared_db');
    try {
      assert.equal(await one(c2, 'SELECT pg_backend_pid()'), pid1);
      assert.equal(await one(c2, 'SHOW work_mem'), defaultWorkMem);
      assert.equal(await one(c2, 'SHOW search_path'), 'newclient, public');
      assert.deepEqual(await customers(c2), NEWCLIENT_ORDERS);
    } finally {
      await c2.end();
    }
  });
});
