// The scenario document's walk-through, through psql exactly as a newcomer types it.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { runPsql } from './helpers/pg.js';
import { startProxy, type TestProxy } from './helpers/proxy.js';

describe('scenario walk-through with psql', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ admin: true });
  });
  after(() => p.close());

  const psql = (user: string, db: string | null, sql: string, password = 'apppass') =>
    runPsql(['-h', 'localhost', '-p', String(p.port), '-U', user, ...(db ? ['-d', db] : []), '-At', '-v', 'ON_ERROR_STOP=1', '-c', sql], { PGPASSWORD: password });

  test('acme.appuser on shared_db reads acme.orders through search_path', async () => {
    const r = await psql('acme.appuser', 'shared_db', 'SELECT customer FROM orders ORDER BY id');
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n'), ['acme-customer-1', 'acme-customer-2', 'acme-customer-3']);
    const sp = await psql('acme.appuser', 'shared_db', 'SHOW search_path');
    assert.equal(sp.stdout.trim(), 'acme, public');
  });

  test('INSERT INTO products lands in acme.products', async () => {
    const r = await psql('acme.appuser', 'shared_db', "INSERT INTO products (name, price) VALUES ('acme-walkthrough', 1) RETURNING (SELECT current_schema())");
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /acme/);
    const again = await psql('acme.appuser', 'shared_db', "SELECT count(*) FROM acme.products WHERE name = 'acme-walkthrough'");
    assert.equal(again.stdout.trim(), '1');
    await psql('acme.appuser', 'shared_db', "DELETE FROM products WHERE name = 'acme-walkthrough'");
  });

  test('widgetco.appuser on widgetco_db reads its own database', async () => {
    const r = await psql('widgetco.appuser', 'widgetco_db', 'SELECT current_database(), string_agg(customer, \',\' ORDER BY id) FROM orders');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'widgetco_db|widgetco-customer-1,widgetco-customer-2');
  });

  test('leaving the database out defaults to the tenant database', async () => {
    const r = await psql('widgetco.appuser', null, 'SELECT current_database()');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'widgetco_db');
  });

  test('shared tables in public stay reachable', async () => {
    const r = await psql('acme.appuser', 'shared_db', 'SELECT name FROM plans ORDER BY id');
    assert.equal(r.stdout.trim(), 'free\npro');
  });

  test('wrong password: 28P01 with PostgreSQL\'s message', async () => {
    const r = await psql('acme.appuser', 'shared_db', 'SELECT 1', 'wrong');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /FATAL: {2}password authentication failed for user "acme\.appuser"/);
  });

  test('unknown tenant and missing separator are refused', async () => {
    const r = await psql('nobody.appuser', 'shared_db', 'SELECT 1');
    assert.match(r.stderr, /FATAL: {2}unknown tenant "nobody"/);
    const r2 = await psql('appuser', 'shared_db', 'SELECT 1');
    assert.match(r2.stderr, /does not name a tenant/);
  });

  test('a database that is not the tenant\'s is refused', async () => {
    const r = await psql('acme.appuser', 'widgetco_db', 'SELECT 1');
    assert.match(r.stderr, /FATAL: {2}permission denied for database "widgetco_db"/);
  });

  test('the admin API lists both tenants', async () => {
    const res = await fetch(`http://127.0.0.1:${p.adminPort}/tenants`);
    const body = (await res.json()) as { tenants: { id: string }[] };
    assert.deepEqual(body.tenants.map((t) => t.id).sort(), ['acme', 'widgetco']);
  });
});
