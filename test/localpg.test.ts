// Guards the scenario every other test builds on: if seeding drifts, proxy tests would fail
// for confusing reasons, so check the cluster directly (no proxy) first.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import pg from 'pg';
import { findPostgresBinDir, SCENARIO, startLocalPostgres } from '../src/localpg/index.js';
import { superQuery, testPg } from './helpers/pg.js';

async function withClient<T>(database: string, fn: (c: pg.Client) => Promise<T>, password: string = SCENARIO.password): Promise<T> {
  const { host, port } = testPg();
  const client = new pg.Client({ host, port, database, user: SCENARIO.role, password });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

const count = async (c: pg.Client, table: string): Promise<number> =>
  Number((await c.query<{ n: string }>(`SELECT count(*) AS n FROM ${table}`)).rows[0]?.n);

describe('localpg scenario', () => {
  test('shared_db holds both schema tenants, each with its own rows', async () => {
    await withClient('shared_db', async (c) => {
      assert.equal(await count(c, 'acme.orders'), 3);
      assert.equal(await count(c, 'newclient.orders'), 2);
      const { rows } = await c.query<{ customer: string }>('SELECT customer FROM acme.orders ORDER BY id');
      assert.deepEqual(rows.map((r) => r.customer), ['acme-customer-1', 'acme-customer-2', 'acme-customer-3']);
      assert.deepEqual((await c.query('SELECT name FROM public.plans ORDER BY id')).rows, [{ name: 'free' }, { name: 'pro' }]);
    });
  });

  test('widgetco_db is a database tenant owned by appuser', async () => {
    await withClient('widgetco_db', async (c) => {
      assert.equal(await count(c, 'orders'), 2);
      assert.equal(await count(c, 'products'), 1);
    });
    assert.equal(await superQuery("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'widgetco_db'"), SCENARIO.role);
    assert.equal(await superQuery("SELECT count(*) FROM pg_database WHERE datname = 'acme_db'"), '0');
  });

  test('a wrong password is rejected with 28P01', async () => {
    await assert.rejects(withClient('shared_db', async () => undefined, 'wrong'), (err: unknown) => {
      assert.equal((err as { code?: string }).code, '28P01');
      return true;
    });
  });
});

describe('localpg lifecycle', () => {
  test('findPostgresBinDir returns a directory with initdb', () => {
    assert.ok(existsSync(join(findPostgresBinDir(), 'initdb')));
  });

  test('a second cluster starts, answers and is removed by an idempotent stop', async () => {
    const local = await startLocalPostgres({ settings: { cluster_name: 'helios lifecycle' } });
    try {
      assert.notEqual(local.port, testPg().port);
      assert.equal(await local.psql('SHOW cluster_name'), 'helios lifecycle');
      await assert.rejects(local.psql('SELECT nope'), /column "nope" does not exist/);
    } finally {
      await local.stop();
      await local.stop();
    }
    assert.equal(existsSync(local.socketDir), false);
  });
});
