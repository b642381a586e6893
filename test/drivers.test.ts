// Real drivers through the proxy, in session and transaction pooling mode: node-postgres (simple, extended,
// named prepared statements, pipelining, errors in transactions), postgres.js (its defaults: named
// statements and pipelining over a pool, sql.begin, multi-statement simple queries, COPY, large results),
// psql's \copy, NOTICE and LISTEN/NOTIFY passthrough, and the ParameterStatus the proxy keeps in line.
// Everything runs through the reference configuration with its guardrails enforced, except the relay of
// what the reference tenants' allowed_operations refuse (COPY, DO, LISTEN/NOTIFY): those tests use a second
// proxy started with guardrails: false (DO as widgetco: a schema tenant may never run procedural code).
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import postgres from 'postgres';
import { runPsql } from './helpers/pg.js';
import { direct, eventually, startProxy, type TestProxy } from './helpers/proxy.js';

const USER = 'acme.appuser';
const DB = 'shared_db';
const PASSWORD = 'apppass';

/** Every test gets a deadline: a proxy that stops answering fails the test instead of stalling the suite. */
const T = { timeout: 20_000 };

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Backend connections currently checked out of the proxy's pools. */
function checkedOut(p: TestProxy): number {
  return p.proxy.ctx.pools.all().reduce((n, pool) => n + pool.stats().active, 0);
}

/** The code of a PostgreSQL error from either driver. */
function sqlState(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string') return err.code;
  return undefined;
}

for (const mode of ['session', 'transaction'] as const) {
  describe(`drivers through the proxy (${mode} mode)`, () => {
    let p: TestProxy;
    /** The same proxy without rate_limits and permissions, for COPY, DO and LISTEN/NOTIFY (schema isolation still holds). */
    let open: TestProxy;
    const table = `acme.drivers_${mode}`;
    const pgs: pg.Client[] = [];
    const sqls: postgres.Sql[] = [];

    /** A node-postgres client through the proxy that gives up rather than hang. */
    const connect = async (extra: Partial<pg.ClientConfig> = {}, via: TestProxy = p): Promise<pg.Client> => {
      const c = new pg.Client({ ...via.clientConfig(USER, DB), connectionTimeoutMillis: 5000, ...extra });
      c.on('error', () => {});
      pgs.push(c);
      await c.connect();
      return c;
    };
    const endAll = async (clients: pg.Client[]): Promise<void> => {
      await Promise.all(clients.map((c) => c.end()));
    };
    const pgjs = (opts: postgres.Options<Record<string, postgres.PostgresType>> = {}, via: TestProxy = p): postgres.Sql => {
      const sql = postgres({ host: '127.0.0.1', port: via.port, user: USER, password: PASSWORD, database: DB, onnotice: () => {}, ...opts });
      sqls.push(sql);
      return sql;
    };
    const pidOf = async (c: pg.Client): Promise<number> => (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
    /**
     * Transaction mode: parks the backend with `pid` in other clients' open transactions, so the next
     * statement of whoever used it must run on another backend. Returns the holders (COMMIT and end them).
     */
    const occupy = async (pid: number): Promise<pg.Client[]> => {
      const holders: pg.Client[] = [];
      for (let i = 0; i < 10; i++) {
        const h = await connect();
        await h.query('BEGIN');
        holders.push(h);
        if ((await pidOf(h)) === pid) return holders;
      }
      throw new Error(`could not park backend ${pid}`);
    };
    const release = async (holders: pg.Client[]): Promise<void> => {
      for (const h of holders) await h.query('COMMIT');
      await endAll(holders);
    };
    const rowsOf = async (): Promise<{ id: number; name: string }[]> =>
      direct<{ id: number; name: string }>(`SELECT id, name FROM ${table} ORDER BY id`, DB);

    before(async () => {
      p = await startProxy({
        mode,
        // max_rows_per_query would refuse the 200k-row result on purpose once enforced: this file tests the relay.
        patch: (c) => {
          for (const t of c.multi_tenancy.tenants) if (t.rate_limits) t.rate_limits.max_rows_per_query = 1_000_000;
        },
      });
      open = await startProxy({ mode, guardrails: false });
      await direct(`DROP TABLE IF EXISTS ${table}; CREATE TABLE ${table} (id int PRIMARY KEY, name text NOT NULL); ALTER TABLE ${table} OWNER TO appuser`, DB);
    });
    after(async () => {
      await Promise.all(sqls.map((s) => s.end({ timeout: 1 })));
      await Promise.all(
        pgs.map(async (c) => {
          await Promise.race([c.end().catch(() => undefined), sleep(1000)]);
          c.connection.stream.destroy();
        }),
      );
      for (const q of [p, open]) {
        if (q === undefined) continue;
        for (const pool of q.proxy.ctx.pools.all()) for (const c of [...pool.busy]) c.destroy(null);
        await q.close();
      }
      await direct(`DROP TABLE IF EXISTS ${table}`, DB);
    });

    describe('node-postgres', () => {
      test('simple query', T, async () => {
        const c = await connect();
        const r = await c.query<{ customer: string }>('SELECT customer FROM orders ORDER BY id');
        assert.deepEqual(
          r.rows.map((x) => x.customer),
          ['acme-customer-1', 'acme-customer-2', 'acme-customer-3'],
        );
        assert.equal(r.command, 'SELECT');
        assert.equal(r.rowCount, 3);
        const empty = await c.query('');
        assert.equal(empty.rows.length, 0, 'an empty query answers EmptyQueryResponse');
        assert.equal((await c.query<{ one: number }>('SELECT 1 AS one')).rows[0]!.one, 1);
        await c.end();
      });

      test('parameterized query (unnamed extended protocol)', T, async () => {
        const c = await connect();
        assert.equal((await c.query<{ s: number }>('SELECT $1::int + $2::int AS s', [2, 40])).rows[0]!.s, 42);
        assert.equal((await c.query<{ customer: string }>('SELECT customer FROM orders WHERE id = $1', [2])).rows[0]!.customer, 'acme-customer-2');
        const r = await c.query<{ t: string; n: string | null }>('SELECT $1::text AS t, $2::text AS n', ['héllo ✓ \'quoted\'', null]);
        assert.deepEqual(r.rows[0], { t: 'héllo ✓ \'quoted\'', n: null });
        await c.end();
      });

      test('named prepared statements are reused across transactions and backends', T, async () => {
        const c = await connect();
        const q1 = (v: number) => ({ name: 'q1', text: 'SELECT $1::int * 10 AS v, pg_backend_pid() AS pid', values: [v] });
        const first = (await c.query<{ v: number; pid: number }>(q1(1))).rows[0]!;
        assert.equal(first.v, 10);
        // Park the backend that prepared q1 elsewhere: the next execution needs a backend that never saw it.
        const holders = mode === 'transaction' ? await occupy(first.pid) : [];
        const second = (await c.query<{ v: number; pid: number }>(q1(2))).rows[0]!;
        assert.equal(second.v, 20);
        if (mode === 'transaction') assert.notEqual(second.pid, first.pid, 'the statement should have run on another backend');
        else assert.equal(second.pid, first.pid, 'session mode keeps its backend');
        await c.query('BEGIN');
        for (let i = 3; i <= 5; i++) assert.equal((await c.query<{ v: number }>(q1(i))).rows[0]!.v, i * 10);
        await c.query('COMMIT');
        await release(holders);
        for (let i = 6; i <= 8; i++) assert.equal((await c.query<{ v: number }>(q1(i))).rows[0]!.v, i * 10);
        await c.end();
      });

      test('the same statement name means different statements in different clients', T, async () => {
        const [a, b] = [await connect(), await connect()];
        for (let i = 0; i < 10; i++) {
          const [ra, rb] = await Promise.all([
            a.query<{ who: string; v: number }>({ name: 'same', text: "SELECT 'a' AS who, $1::int + 1 AS v", values: [i] }),
            b.query<{ who: string; v: number }>({ name: 'same', text: "SELECT 'b' AS who, $1::int + 2 AS v", values: [i] }),
          ]);
          assert.deepEqual(ra.rows[0], { who: 'a', v: i + 1 });
          assert.deepEqual(rb.rows[0], { who: 'b', v: i + 2 });
        }
        await endAll([a, b]);
      });

      test('named statements under concurrency: several clients shuffling backends', T, async () => {
        const clients = await Promise.all([connect(), connect(), connect(), connect(), connect()]);
        const pidsPerClient = clients.map(() => new Set<number>());
        await Promise.all(
          clients.map(async (c, ci) => {
            for (let i = 0; i < 20; i++) {
              const inTx = i % 3 === 0;
              if (inTx) await c.query('BEGIN');
              const r1 = await c.query<{ v: number; pid: number }>({ name: 'mul', text: 'SELECT $1::int * $2::int AS v, pg_backend_pid() AS pid', values: [ci, i] });
              assert.equal(r1.rows[0]!.v, ci * i);
              pidsPerClient[ci]!.add(r1.rows[0]!.pid);
              const r2 = await c.query<{ n: number }>({ name: 'cnt', text: 'SELECT count(*)::int AS n FROM orders WHERE id <= $1', values: [(i % 3) + 1] });
              assert.equal(r2.rows[0]!.n, (i % 3) + 1);
              if (inTx) await c.query('COMMIT');
            }
          }),
        );
        if (mode === 'session') for (const s of pidsPerClient) assert.equal(s.size, 1);
        else assert.ok(pidsPerClient.some((s) => s.size > 1), 'in transaction mode clients should have moved between backends');
        await endAll(clients);
      });

      test('pipelining: 50 queries in flight at once, one of them failing', T, async () => {
        const c = await connect({ pipeline: true });
        const pending = Array.from({ length: 50 }, (_, i) => {
          if (i === 25) return c.query('SELECT 1 / (g - 1) FROM generate_series(1, 1) g');
          if (i % 3 === 0) return c.query({ name: 'pipe', text: 'SELECT $1::int AS i', values: [i] });
          if (i % 3 === 1) return c.query('SELECT $1::int AS i', [i]);
          return c.query(`SELECT ${i} AS i`);
        });
        const results = await Promise.allSettled(pending);
        results.forEach((r, i) => {
          if (i === 25) {
            assert.equal(r.status, 'rejected');
            assert.equal(sqlState(r.status === 'rejected' ? r.reason : null), '22012');
          } else {
            assert.equal(r.status, 'fulfilled', `query ${i}: ${r.status === 'rejected' ? String(r.reason) : ''}`);
            if (r.status === 'fulfilled') assert.deepEqual(r.value.rows, [{ i }]);
          }
        });
        // A whole transaction pipelined: BEGIN … COMMIT must stay on one backend in transaction mode too.
        const tx = await Promise.all([
          c.query('BEGIN'),
          c.query(`INSERT INTO ${table} VALUES ($1, $2)`, [1, 'pipelined-1']),
          c.query(`INSERT INTO ${table} VALUES ($1, $2)`, [2, 'pipelined-2']),
          c.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${table}`),
          c.query('COMMIT'),
        ]);
        assert.equal(tx[3].rows[0]!.n, 2);
        assert.deepEqual(await rowsOf(), [
          { id: 1, name: 'pipelined-1' },
          { id: 2, name: 'pipelined-2' },
        ]);
        await c.query(`DELETE FROM ${table}`);
        await c.end();
      });

      test('an error inside a transaction, ROLLBACK, and the client carries on', T, async () => {
        const c = await connect();
        await c.query('BEGIN');
        await c.query(`INSERT INTO ${table} VALUES (10, 'rolled-back')`);
        await assert.rejects(c.query('SELECT 1 / 0'), (e: unknown) => sqlState(e) === '22012');
        await assert.rejects(c.query('SELECT 1'), (e: unknown) => sqlState(e) === '25P02');
        await assert.rejects(c.query({ name: 'aborted', text: 'SELECT $1::int AS v', values: [1] }), (e: unknown) => sqlState(e) === '25P02');
        await c.query('ROLLBACK');
        assert.equal((await c.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${table}`)).rows[0]!.n, 0);
        assert.equal((await c.query<{ v: number }>({ name: 'aborted', text: 'SELECT $1::int AS v', values: [7] })).rows[0]!.v, 7);
        assert.equal((await c.query<{ n: number }>('SELECT count(*)::int AS n FROM orders')).rows[0]!.n, 3);
        // An error outside a transaction block leaves nothing behind either.
        await assert.rejects(c.query('SELECT * FROM no_such_table'), (e: unknown) => sqlState(e) === '42P01');
        assert.equal((await c.query<{ one: number }>('SELECT 1 AS one')).rows[0]!.one, 1);
        assert.deepEqual(await rowsOf(), []);
        await c.end();
      });

      test('large single messages (a 10 MB parameter and a 10 MB field) pass intact', T, async () => {
        const c = await connect();
        const big = 'héllo-'.repeat(1_750_000); // ~10.5 MB of UTF-8
        const r = await c.query<{ len: number; h: string; back: string }>('SELECT length($1::text) AS len, md5($1::text) AS h, $1::text AS back', [big]);
        assert.equal(r.rows[0]!.len, big.length);
        assert.equal(r.rows[0]!.back, big);
        assert.equal((await c.query<{ n: number }>('SELECT 1 AS n')).rows[0]!.n, 1);
        await c.end();
      });

      test('DISCARD ALL and RESET ALL keep the tenant on its schema', T, async () => {
        const c = await connect();
        const count = async (): Promise<number> => (await c.query<{ n: number }>('SELECT count(*)::int AS n FROM orders')).rows[0]!.n;
        await c.query('DISCARD ALL');
        assert.equal(await count(), 3);
        await c.query('RESET ALL');
        assert.equal(await count(), 3);
        await c.query('RESET search_path');
        assert.equal(await count(), 3);
        assert.equal((await c.query<{ s: string }>('SELECT current_schema() AS s')).rows[0]!.s, 'acme');
        await c.end();
      });

      test('RESET and DISCARD ALL bring back the values the client gave at startup, as PostgreSQL does', T, async () => {
        // JDBC sends TimeZone at startup and Npgsql runs DISCARD ALL when a pooled connection is returned.
        const c = await connect({ application_name: 'drivers-startup', options: '-c TimeZone=Pacific/Auckland' });
        const settings = async (): Promise<string> =>
          (await c.query<{ s: string }>("SELECT current_setting('application_name') || ' ' || current_setting('TimeZone') AS s")).rows[0]!.s;
        assert.equal(await settings(), 'drivers-startup Pacific/Auckland');
        await c.query("SET application_name = 'changed'; SET TimeZone = 'UTC'");
        assert.equal(await settings(), 'changed UTC');
        await c.query('RESET application_name; RESET TimeZone');
        const afterReset = await settings();
        await c.query("SET application_name = 'changed-again'; SET TimeZone = 'UTC'");
        await c.query('DISCARD ALL');
        const afterDiscard = await settings();
        assert.deepEqual({ afterReset, afterDiscard }, { afterReset: 'drivers-startup Pacific/Auckland', afterDiscard: 'drivers-startup Pacific/Auckland' });
        await c.end();
      });

      test('a startup statement_timeout applies on every backend the client uses, and to nobody else', T, async () => {
        const c = await connect({ statement_timeout: 300 });
        await assert.rejects(c.query('SELECT pg_sleep(1)'), (e: unknown) => sqlState(e) === '57014');
        const pid = await pidOf(c);
        const holders = mode === 'transaction' ? await occupy(pid) : [];
        await assert.rejects(c.query('SELECT pg_sleep(1) AS again'), (e: unknown) => sqlState(e) === '57014');
        await release(holders);
        const other = await connect();
        assert.equal((await other.query<{ statement_timeout: string }>('SHOW statement_timeout')).rows[0]!.statement_timeout, '0');
        await other.query('SELECT pg_sleep(0.4)');
        await endAll([c, other]);
      });

      test("psql's \\copy in and out", T, async () => {
        // COPY is outside acme's allowed_operations: the relay is tested through the proxy without guardrails.
        const args = ['-h', '127.0.0.1', '-p', String(open.port), '-U', USER, '-d', DB, '-X', '-q', '-At', '-v', 'ON_ERROR_STOP=1', '-f', '-'];
        const lines = Array.from({ length: 20_000 }, (_, i) => `${100 + i}\tpsql-${i}`);
        const load = await runPsql(args, { PGPASSWORD: PASSWORD }, `\\copy ${table} (id, name) FROM STDIN\n${lines.join('\n')}\n\\.\n`);
        assert.equal(load.code, 0, load.stderr);
        const out = await runPsql(args, { PGPASSWORD: PASSWORD }, `\\copy (SELECT id, name FROM ${table} ORDER BY id) TO STDOUT\n`);
        assert.equal(out.code, 0, out.stderr);
        assert.deepEqual(out.stdout.trimEnd().split('\n'), lines);
        // A bad row fails the COPY and nothing is loaded.
        const bad = await runPsql(args, { PGPASSWORD: PASSWORD }, `\\copy ${table} (id, name) FROM STDIN\n9999\tok\nnot-a-number\tbad\n\\.\nSELECT 'after';\n`);
        assert.notEqual(bad.code, 0);
        assert.match(bad.stderr, /invalid input syntax for type integer/);
        assert.equal((await rowsOf()).length, 20_000);
        await direct(`DELETE FROM ${table}`, DB);
      });
    });

    describe('postgres.js', () => {
      test('defaults (named statements, pipelining) with max 5 connections and 300 concurrent queries', T, async () => {
        const sql = pgjs({ max: 5 });
        const results = await Promise.all(
          Array.from({ length: 300 }, (_, i) =>
            i % 2 === 0 ? sql`SELECT ${i}::int AS i, 'even' AS kind` : sql`SELECT ${i}::int AS i, ${'odd'}::text AS kind, count(*)::int AS n FROM orders`,
          ),
        );
        results.forEach((rows, i) => {
          assert.equal(rows.length, 1);
          assert.equal(rows[0]!.i, i);
          assert.equal(rows[0]!.kind, i % 2 === 0 ? 'even' : 'odd');
          if (i % 2 === 1) assert.equal(rows[0]!.n, 3);
        });
        const pids = new Set((await Promise.all(Array.from({ length: 50 }, () => sql`SELECT pg_backend_pid() AS pid`))).map((r) => r[0]!.pid));
        // Session mode pins one backend to each of postgres.js' (at most 5) connections.
        if (mode === 'session') assert.ok(pids.size <= 5, `${pids.size} backends for 5 connections`);
      });

      test('sql.begin commits, a throw rolls back, and concurrent transactions stay apart', T, async () => {
        const sql = pgjs({ max: 5 });
        const seen = await sql.begin(async (tx) => {
          await tx`INSERT INTO ${tx(table)} ${tx({ id: 1, name: 'begin-1' })}`;
          await tx.unsafe(`INSERT INTO ${table} VALUES (2, 'begin-2')`);
          const [r] = await tx.unsafe<{ n: number }[]>(`SELECT count(*)::int AS n FROM ${table}`);
          return r!.n;
        });
        assert.equal(seen, 2);
        await assert.rejects(
          sql.begin(async (tx) => {
            await tx.unsafe(`INSERT INTO ${table} VALUES (3, 'never')`);
            throw new Error('roll back please');
          }),
          /roll back please/,
        );
        await Promise.all(
          Array.from({ length: 10 }, (_, i) =>
            sql.begin(async (tx) => {
              await tx.unsafe(`INSERT INTO ${table} VALUES ($1, $2)`, [100 + i, `concurrent-${i}`]);
              const [mine] = await tx.unsafe<{ n: number }[]>(`SELECT count(*)::int AS n FROM ${table} WHERE id = $1`, [100 + i]);
              assert.equal(mine!.n, 1);
            }),
          ),
        );
        const rows = await rowsOf();
        assert.deepEqual(
          rows.map((r) => r.id),
          [1, 2, ...Array.from({ length: 10 }, (_, i) => 100 + i)],
        );
        await sql.unsafe(`DELETE FROM ${table}`);
      });

      test('sql.unsafe runs a multi-statement simple query', T, async () => {
        const sql = pgjs({ max: 1 });
        // postgres.js starts a new result at each RowDescription: three row-returning statements, three results.
        const res: unknown = await sql.unsafe(`SELECT 1 AS a; INSERT INTO ${table} VALUES (1, 'multi'); SELECT name AS b FROM ${table}; DELETE FROM ${table}; SELECT 3 AS c`);
        assert.ok(Array.isArray(res), 'a multi-statement query resolves to one result per statement');
        assert.deepEqual(JSON.parse(JSON.stringify(res)), [[{ a: 1 }], [{ b: 'multi' }], [{ c: 3 }]]);
        assert.deepEqual(await rowsOf(), []);
      });

      test('COPY FROM STDIN and COPY TO STDOUT through writable and readable streams', T, async () => {
        const sql = pgjs({ max: 2 }, open); // COPY is outside acme's allowed_operations
        const lines = Array.from({ length: 2000 }, (_, i) => `${i + 1}\tcopy-${i + 1}-${'x'.repeat(i % 50)}\n`);
        const writable = await sql.unsafe(`COPY ${table} (id, name) FROM STDIN`).writable();
        await pipeline(Readable.from(lines), writable);
        const [counted] = await sql.unsafe<{ n: number }[]>(`SELECT count(*)::int AS n FROM ${table}`);
        assert.equal(counted!.n, 2000);
        const readable = await sql.unsafe(`COPY (SELECT id, name FROM ${table} ORDER BY id) TO STDOUT`).readable();
        const chunks: Buffer[] = [];
        // Flowing mode on purpose: postgres.js pauses its socket when a paused-mode reader (for await) lets the
        // stream buffer fill, and never resumes it if CopyDone arrives then: the connection hangs, proxy or not.
        await new Promise<void>((resolve, reject) => {
          readable.on('data', (chunk: Buffer) => chunks.push(chunk));
          readable.once('end', resolve);
          readable.once('error', reject);
        });
        assert.equal(Buffer.concat(chunks).toString('utf8'), lines.join(''));
        // The connection that did the COPY is usable right after.
        const again = await Promise.all(Array.from({ length: 10 }, (_, i) => sql`SELECT ${i}::int AS i`));
        assert.deepEqual(
          again.map((r) => r[0]!.i),
          Array.from({ length: 10 }, (_, i) => i),
        );
        await sql.unsafe(`DELETE FROM ${table}`);
      });

      test('a cursor fetches in batches (no Sync between them) while other queries run', T, async () => {
        const sql = pgjs({ max: 2 });
        let seen = 0;
        let batches = 0;
        const other = Promise.all(Array.from({ length: 20 }, (_, i) => sql`SELECT ${i}::int AS i`));
        await sql`SELECT g FROM generate_series(1, 1000) g`.cursor(100, (rows) => {
          batches++;
          for (const r of rows) assert.equal(r.g, ++seen);
        });
        assert.equal(seen, 1000);
        assert.equal(batches, 10);
        assert.equal((await other).length, 20);
        const [after] = await sql`SELECT count(*)::int AS n FROM orders`;
        assert.equal(after!.n, 3);
      });

      test('a large result (200k rows) arrives complete', T, async () => {
        const sql = pgjs({ max: 2 });
        const rows = await sql<{ g: number; h: string }[]>`SELECT g, md5(g::text) AS h FROM generate_series(1, ${200_000}::int) g`;
        assert.equal(rows.length, 200_000);
        assert.equal(rows[0]!.g, 1);
        assert.equal(rows[199_999]!.g, 200_000);
        let sum = 0;
        for (const r of rows) sum += r.g;
        assert.equal(sum, (200_000 * 200_001) / 2);
        assert.equal(rows[41_999]!.h, (await sql<{ h: string }[]>`SELECT md5('42000') AS h`)[0]!.h);
        // The same through the simple protocol.
        const simple = await sql.unsafe<{ g: number }[]>('SELECT g FROM generate_series(1, 200000) g');
        assert.equal(simple.length, 200_000);
      });
    });

    describe('notices, notifications and ParameterStatus', () => {
      test('RAISE NOTICE reaches node-postgres and postgres.js', T, async () => {
        // DO is outside allowed_operations, and for a schema-isolated tenant like acme it is refused whatever
        // the permissions say (procedural code cannot be checked for schema isolation). widgetco, isolated by
        // database, may run it once its permissions are off: the relay of NoticeResponse is the same.
        const widgetco = { user: 'widgetco.appuser', database: 'widgetco_db' };
        const c = await connect(widgetco, open);
        const notices: string[] = [];
        c.on('notice', (n) => notices.push(n.message ?? ''));
        await c.query("DO $$ BEGIN RAISE NOTICE 'drivers notice %', 42; END $$");
        await c.query("DO $$ BEGIN RAISE WARNING 'drivers warning'; END $$");
        assert.deepEqual(notices, ['drivers notice 42', 'drivers warning']);
        await c.end();

        const got: string[] = [];
        const sql = pgjs({ ...widgetco, max: 1, onnotice: (n) => got.push(String(n.message)) }, open);
        await sql`DO $$ BEGIN RAISE NOTICE 'from postgres.js'; END $$`;
        assert.deepEqual(got, ['from postgres.js']);
      });

      test('LISTEN/NOTIFY passes through (session mode)', { ...T, skip: mode !== 'session' && 'LISTEN needs a pinned backend: not offered in transaction mode' }, async () => {
        // LISTEN and NOTIFY are outside acme's allowed_operations: the proxy without guardrails relays them.
        const listener = await connect({}, open);
        const got: { channel: string; payload: string | undefined }[] = [];
        listener.on('notification', (n) => got.push({ channel: n.channel, payload: n.payload }));
        await listener.query('LISTEN drivers_channel');
        const notifier = await connect({}, open);
        await notifier.query("NOTIFY drivers_channel, 'hello'");
        await notifier.query("SELECT pg_notify('drivers_channel', 'second')");
        await eventually(() => got.length === 2, 3000, 'two notifications');
        assert.deepEqual(got, [
          { channel: 'drivers_channel', payload: 'hello' },
          { channel: 'drivers_channel', payload: 'second' },
        ]);
        // postgres.js' listen() keeps its own dedicated connection.
        const sql = pgjs({ max: 2 }, open);
        const values: string[] = [];
        await sql.listen('drivers_pgjs', (v) => values.push(v));
        await sql.notify('drivers_pgjs', 'via postgres.js');
        await eventually(() => values.length === 1, 3000, 'the postgres.js notification');
        assert.deepEqual(values, ['via postgres.js']);
        await endAll([listener, notifier]);
      });

      test('startup ParameterStatus, and SET application_name follows the client', T, async () => {
        const c = new pg.Client({ ...p.clientConfig(USER, DB), connectionTimeoutMillis: 5000 });
        c.on('error', () => {});
        pgs.push(c);
        const reported = new Map<string, string>();
        c.connection.on('parameterStatus', (msg: { parameterName: string; parameterValue: string }) => reported.set(msg.parameterName, msg.parameterValue));
        await c.connect();
        assert.match(reported.get('server_version') ?? '', /^\d+/);
        assert.equal(reported.get('client_encoding'), 'UTF8');
        assert.equal(reported.get('server_encoding') !== undefined, true);

        await c.query("SET application_name = 'drivers-x'");
        assert.equal(reported.get('application_name'), 'drivers-x', 'the SET is reported back');
        const show = async (): Promise<string> => (await c.query<{ application_name: string }>('SHOW application_name')).rows[0]!.application_name;
        assert.equal(await show(), 'drivers-x');
        const pid = await pidOf(c);
        const holders = mode === 'transaction' ? await occupy(pid) : [];
        assert.equal(await show(), 'drivers-x', 'still set on the next statement');
        if (mode === 'transaction') assert.notEqual(await pidOf(c), pid, 'that statement should have run on another backend');
        await release(holders);

        // Whoever uses a backend next does not inherit this client's setting.
        const other = await connect();
        assert.equal((await other.query<{ application_name: string }>('SHOW application_name')).rows[0]!.application_name, '');
        assert.equal(await show(), 'drivers-x');
        await endAll([c, other]);
      });

      test('an application_name given at startup sticks across backends', T, async () => {
        const c = await connect({ application_name: 'drivers-startup' });
        const first = await pidOf(c);
        const holders = mode === 'transaction' ? await occupy(first) : [];
        const r = await c.query<{ a: string; pid: number }>('SELECT current_setting(\'application_name\') AS a, pg_backend_pid() AS pid');
        assert.equal(r.rows[0]!.a, 'drivers-startup');
        if (mode === 'transaction') assert.notEqual(r.rows[0]!.pid, first);
        await release(holders);
        await c.end();
      });

      test('postgres.js sees the reported parameters', T, async () => {
        const sql = pgjs({ max: 1 });
        await sql`SELECT 1`;
        assert.equal(sql.parameters.client_encoding, 'UTF8');
        assert.match(String(sql.parameters.server_version), /^\d+/);
        assert.equal(sql.parameters.application_name, 'postgres.js');
      });
    });

    test('no backend stays checked out once clients are idle', { ...T, skip: mode !== 'transaction' && 'session mode pins a backend per client' }, async () => {
      await eventually(() => checkedOut(p) + checkedOut(open) === 0, 3000, 'every backend to be back in its pool');
    });
  });
}
