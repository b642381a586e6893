// pgbench through the proxy: the select-only script in every query mode (simple, extended, prepared) in
// transaction pooling, prepared in session pooling, and the read-write TPC-B-like script. The pgbench tables
// are created directly in schema acme (appuser owns it) and dropped afterwards.
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { isExecutable, run, type RunResult } from '../src/localpg/proc.js';
import { testPg } from './helpers/pg.js';
import { direct, eventually, startProxy, type TestProxy } from './helpers/proxy.js';

const DB = 'shared_db';
const PASSWORD = 'apppass';
const TABLES = ['pgbench_accounts', 'pgbench_branches', 'pgbench_history', 'pgbench_tellers'];
const T = { timeout: 30_000 };

function pgbenchBin(): string {
  const dir = testPg().binDir;
  return isExecutable(join(dir, 'pgbench')) ? join(dir, 'pgbench') : 'pgbench';
}

function pgbench(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return run(pgbenchBin(), args, { env: { ...process.env, PGPASSWORD: PASSWORD, PGCONNECT_TIMEOUT: '10', ...env } });
}

interface BenchResult {
  tps: number;
  transactions: number;
  failed: number;
  output: string;
}

/** Checks a pgbench run finished cleanly and extracts its numbers. */
function parseRun(r: RunResult): BenchResult {
  const output = `${r.stdout}\n${r.stderr}`;
  assert.equal(r.code, 0, `pgbench exited with ${r.code}:\n${output}`);
  assert.doesNotMatch(output, /error|aborted/i, output);
  const tps = Number(/^tps = ([\d.]+)/m.exec(r.stdout)?.[1] ?? NaN);
  const transactions = Number(/number of transactions actually processed: (\d+)/.exec(r.stdout)?.[1] ?? NaN);
  const failed = Number(/number of failed transactions: (\d+)/.exec(r.stdout)?.[1] ?? 0);
  return { tps, transactions, failed, output };
}

async function historyRows(): Promise<number> {
  return (await direct<{ n: number }>('SELECT count(*)::int AS n FROM acme.pgbench_history', DB))[0]!.n;
}

describe('pgbench through the proxy', () => {
  const proxies = new Map<'session' | 'transaction', TestProxy>();

  before(async () => {
    const db = testPg();
    // Directly against the cluster as appuser: the tables land in acme through search_path.
    const init = await pgbench(['-i', '-s', '1', '-q', '-h', db.host, '-p', String(db.port), '-U', 'appuser', DB], { PGOPTIONS: '-c search_path=acme' });
    assert.equal(init.code, 0, `pgbench -i failed:\n${init.stderr}`);
    const where = await direct<{ table_name: string }>(
      "SELECT table_name FROM information_schema.tables WHERE table_schema = 'acme' AND table_name LIKE 'pgbench%' ORDER BY 1",
      DB,
    );
    assert.deepEqual(
      where.map((r) => r.table_name),
      TABLES,
    );
    for (const mode of ['session', 'transaction'] as const) {
      proxies.set(
        mode,
        await startProxy({
          mode,
          // pgbench runs thousands of statements a second: keep an enforced qps_limit from turning into errors here.
          patch: (c) => {
            for (const t of c.multi_tenancy.tenants) if (t.rate_limits) t.rate_limits.qps_limit = 1_000_000;
          },
        }),
      );
    }
  });

  after(async () => {
    for (const p of proxies.values()) await p.close();
    await direct(`DROP TABLE IF EXISTS ${TABLES.map((t) => `acme.${t}`).join(', ')}`, DB);
  });

  const through = (mode: 'session' | 'transaction', args: string[]): Promise<RunResult> =>
    pgbench([...args, '-n', '-T', '3', '-c', '4', '-j', '2', '-h', '127.0.0.1', '-p', String(proxies.get(mode)!.port), '-U', 'acme.appuser', DB]);

  for (const queryMode of ['simple', 'extended', 'prepared'] as const) {
    test(`select-only, -M ${queryMode}, transaction pooling`, T, async (t) => {
      const r = parseRun(await through('transaction', ['-S', '-M', queryMode]));
      t.diagnostic(`${r.tps.toFixed(0)} tps`);
      assert.ok(r.tps > 0, r.output);
      assert.ok(r.transactions > 0, r.output);
      assert.equal(r.failed, 0);
    });
  }

  test('select-only, -M prepared, session pooling', T, async (t) => {
    const r = parseRun(await through('session', ['-S', '-M', 'prepared']));
    t.diagnostic(`${r.tps.toFixed(0)} tps`);
    assert.ok(r.tps > 0, r.output);
    assert.equal(r.failed, 0);
  });

  test('read-write TPC-B-like script, -M extended, transaction pooling', T, async (t) => {
    const before = await historyRows();
    const r = parseRun(await through('transaction', ['-M', 'extended']));
    t.diagnostic(`${r.tps.toFixed(0)} tps`);
    assert.ok(r.tps > 0, r.output);
    assert.equal(r.failed, 0);
    // Every committed transaction inserted one history row.
    assert.equal((await historyRows()) - before, r.transactions);
  });

  test('every backend is back in the pool afterwards', T, async () => {
    for (const [mode, p] of proxies) {
      const out = (): number => p.proxy.ctx.pools.all().reduce((n, pool) => n + pool.stats().active, 0);
      await eventually(() => out() === 0, 3000, `${mode} mode to have no backend checked out (${out()} are)`);
    }
  });
});
