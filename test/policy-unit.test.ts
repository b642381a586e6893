// The statement classifier and per-tenant check as pure functions: a table of schema-isolation escape
// attempts that must all be refused, statements drivers and apps send that must pass, and the permission
// rules of the reference tenants. The wire-level behaviour is tested in guardrails.test.ts.
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { normalizeLiterals, FactsCache } from '../src/policy/cache.js';
import { loadParser } from '../src/policy/classify.js';
import { checkStatement, type TenantRules } from '../src/policy/check.js';
import { PermissionsSchema } from '../src/config/schema.js';

const cache = new FactsCache();

const acme: TenantRules = {
  id: 'acme',
  allowedSchemas: new Set(['acme', 'public', 'pg_temp']),
  permissions: PermissionsSchema.parse({
    allowed_operations: ['SELECT', 'INSERT', 'UPDATE', 'DELETE'],
    read_only: false,
    allow_ddl: true,
    allow_explain: true,
    allow_system_access: false,
    max_tables_per_query: 10,
  }),
};
const widgetco: TenantRules = {
  id: 'widgetco',
  allowedSchemas: null,
  permissions: PermissionsSchema.parse({ allow_ddl: false, allow_system_access: false, max_tables_per_query: 5 }),
};

function verdict(sql: string, rules: TenantRules): string | null {
  const c = cache.lookup(sql);
  if (c instanceof Error) return 'parse error';
  for (const f of c) {
    const r = checkStatement(f, rules);
    if (r !== null) return `${r.code} ${r.reason}: ${r.message}`;
  }
  return null;
}

before(() => loadParser());

describe('schema isolation: escape attempts are refused', () => {
  const attempts = [
    'SELECT * FROM newclient.orders',
    'SELECT * FROM "newclient".orders',
    'SELECT * FROM NEWCLIENT.orders',
    'SELECT * FROM U&"\\006eewclient".orders',
    'SELECT * FROM newclient . orders',
    'SELECT * FROM/* comment */newclient.orders',
    'SELECT 1; SELECT * FROM newclient.orders',
    'SELECT * FROM orders WHERE id IN (SELECT id FROM newclient.orders)',
    'WITH x AS (SELECT * FROM newclient.orders) SELECT * FROM x',
    'WITH d AS (DELETE FROM newclient.orders RETURNING *) SELECT * FROM d',
    'INSERT INTO acme.orders (customer, amount) SELECT customer, amount FROM newclient.orders',
    'UPDATE orders SET amount = (SELECT max(amount) FROM newclient.orders)',
    'DELETE FROM newclient.orders',
    'SELECT newclient.orders.customer FROM orders',
    'SELECT * FROM shared_db.newclient.orders',
    'SELECT newclient.some_function()',
    "SELECT nextval('newclient.orders_id_seq')",
    "SELECT 'newclient.orders'::regclass",
    "SELECT pg_catalog.pg_relation_size('newclient.orders'::regclass)",
    'SET search_path TO newclient',
    'SET search_path = newclient, public',
    'SET LOCAL search_path TO "newclient"',
    "SELECT set_config('search_path', 'newclient', false)",
    "SELECT set_config('search_path', 'acme, newclient', true)",
    'SET ROLE postgres',
    'SET SESSION AUTHORIZATION postgres',
    "SELECT set_config('role', 'postgres', false)",
    'CREATE VIEW v AS SELECT * FROM newclient.orders',
    'CREATE TABLE newclient.stolen (id int)',
    'CREATE TABLE t AS SELECT * FROM newclient.orders',
    'SELECT * INTO copied FROM newclient.orders',
    'ALTER TABLE orders SET SCHEMA newclient',
    'DROP TABLE newclient.orders',
    'CREATE SCHEMA evil',
    'GRANT ALL ON ALL TABLES IN SCHEMA newclient TO appuser',
    "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM newclient.orders'",
    'CREATE FUNCTION g() RETURNS int LANGUAGE plpgsql AS $$BEGIN RETURN (SELECT count(*) FROM newclient.orders); END$$',
    "CREATE FUNCTION h() RETURNS int LANGUAGE sql SET search_path = newclient AS 'SELECT 1'",
    "DO $$BEGIN EXECUTE 'DELETE FROM newclient.orders'; END$$",
    "SELECT query_to_xml('SELECT * FROM newclient.orders', true, true, '')",
    "SELECT table_to_xml('newclient.orders', true, true, '')",
    "SELECT dblink('dbname=shared_db', 'SELECT 1')",
    'SELECT lo_get(12345)',
    'EXPLAIN SELECT * FROM newclient.orders',
    'EXPLAIN ANALYZE SELECT * FROM newclient.orders',
    'COPY newclient.orders TO STDOUT',
    'COPY (SELECT * FROM newclient.orders) TO STDOUT',
    'SELECT * FROM orders o JOIN LATERAL (SELECT * FROM newclient.products) p ON true',
    'SELECT ROW(1)::newclient.orders',
    'PREPARE p AS SELECT * FROM newclient.orders',
    'DECLARE c CURSOR FOR SELECT * FROM newclient.orders',
    'SET standard_conforming_strings = off',
    "SET client_encoding = 'SJIS'",
    'TRUNCATE newclient.orders',
    'LOCK TABLE newclient.orders',
    'SELECT * FROM pg_catalog.pg_class',
    'SELECT * FROM information_schema.tables',
    'SELECT * FROM pg_stat_activity',
    'SELECT pg_terminate_backend(1)',
    "SELECT pg_read_file('/etc/passwd')",
    'CREATE EXTENSION dblink',
    'ALTER SYSTEM SET work_mem = 1',
  ];
  for (const sql of attempts) {
    test(sql, () => {
      const v = verdict(sql, acme);
      assert.ok(v !== null && v.startsWith('42501'), `expected a 42501 refusal, got ${v}`);
    });
  }
});

describe('statements that must keep working for a schema tenant', () => {
  const fine = [
    'SELECT * FROM orders',
    'SELECT * FROM acme.orders',
    'SELECT * FROM "acme"."orders"',
    'SELECT * FROM public.plans',
    'SELECT * FROM plans',
    'SELECT 1',
    'SELECT now(), pg_catalog.now(), count(*) FROM orders',
    'SELECT CAST(amount AS int), amount::numeric(10,2) FROM orders',
    "SELECT nextval('acme.orders_id_seq'), nextval('orders_id_seq')",
    "SELECT 'acme.orders'::regclass",
    'INSERT INTO orders (customer, amount) VALUES ($1, $2) RETURNING id',
    'UPDATE products SET price = price * 1.1 WHERE id = 1',
    'DELETE FROM orders WHERE id = -1',
    'WITH x AS (SELECT * FROM orders) SELECT * FROM x',
    'BEGIN',
    'BEGIN ISOLATION LEVEL SERIALIZABLE',
    'COMMIT',
    'ROLLBACK',
    'SAVEPOINT s1',
    'RELEASE SAVEPOINT s1',
    "SET application_name = 'myapp'",
    "SET client_encoding = 'UTF8'",
    'SET statement_timeout = 1000',
    'SET search_path TO acme, public',
    'SHOW search_path',
    'SHOW ALL',
    'RESET ALL',
    'DISCARD ALL',
    'DEALLOCATE ALL',
    'CREATE TABLE acme_tmp (id int)',
    'CREATE TEMP TABLE t (id int)',
    'CREATE INDEX ON orders (customer)',
    'DROP TABLE IF EXISTS acme_tmp',
    'ALTER TABLE orders ADD COLUMN note text',
    "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM orders'",
    'EXPLAIN SELECT * FROM orders',
    'EXPLAIN ANALYZE SELECT * FROM orders',
    // what postgres.js sends at connect to learn array types
    "select b.oid, b.typarray from pg_catalog.pg_type a left join pg_catalog.pg_type b on b.oid = a.typelem where a.typcategory = 'A' group by b.oid, b.typarray order by b.oid",
  ];
  for (const sql of fine) {
    test(sql, () => assert.equal(verdict(sql, acme), null));
  }
});

describe('permissions of the reference tenants', () => {
  test('widgetco may not run DDL (allow_ddl = false)', () => {
    for (const sql of ['CREATE TABLE t (id int)', 'DROP TABLE orders', 'ALTER TABLE orders ADD x int', 'TRUNCATE orders', 'SELECT * INTO t2 FROM orders', 'CREATE TABLE t AS SELECT 1', 'GRANT SELECT ON orders TO public']) {
      assert.match(verdict(sql, widgetco) ?? 'allowed', /^42501 permission: .*DDL is not allowed/, sql);
    }
  });

  test('operations outside allowed_operations are refused, wherever they hide', () => {
    for (const sql of ['TRUNCATE orders', 'COPY orders FROM STDIN', 'CALL p()', 'LOCK TABLE orders', 'LISTEN ch', "NOTIFY ch, 'x'", 'MERGE INTO orders o USING products p ON false WHEN NOT MATCHED THEN DO NOTHING']) {
      assert.notEqual(verdict(sql, widgetco), null, sql);
    }
    const selectOnly: TenantRules = { ...widgetco, permissions: PermissionsSchema.parse({ allowed_operations: ['SELECT'] }) };
    assert.match(verdict('WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d', selectOnly) ?? '', /DELETE is not allowed/);
    assert.match(verdict('EXPLAIN ANALYZE DELETE FROM orders', selectOnly) ?? '', /DELETE is not allowed/);
    assert.equal(verdict('EXPLAIN DELETE FROM orders', selectOnly), null, 'plain EXPLAIN runs nothing');
    assert.match(verdict('SELECT 1; DELETE FROM orders', selectOnly) ?? '', /DELETE is not allowed/);
  });

  test('read_only refuses writes and read-write transactions', () => {
    const ro: TenantRules = { ...widgetco, permissions: PermissionsSchema.parse({ allowed_operations: ['SELECT', 'INSERT'], read_only: true }) };
    assert.match(verdict('INSERT INTO orders VALUES (1)', ro) ?? '', /read-only/);
    assert.match(verdict('BEGIN READ WRITE', ro) ?? '', /read-only/);
    assert.match(verdict('SET TRANSACTION READ WRITE', ro) ?? '', /read-only/);
    assert.match(verdict('SET default_transaction_read_only = off', ro) ?? '', /read-only/);
    assert.equal(verdict('SELECT * FROM orders', ro), null);
    assert.equal(verdict('BEGIN', ro), null);
  });

  test('allow_explain = false refuses EXPLAIN', () => {
    const noExplain: TenantRules = { ...widgetco, permissions: PermissionsSchema.parse({ allow_explain: false }) };
    assert.match(verdict('EXPLAIN SELECT 1', noExplain) ?? '', /EXPLAIN is not allowed/);
  });

  test('max_tables_per_query counts distinct relations across the whole statement', () => {
    assert.equal(verdict('SELECT * FROM a, b, c, d, e', widgetco), null);
    assert.match(verdict('SELECT * FROM a, b, c, d, e, f', widgetco) ?? '', /uses 6 tables, above max_tables_per_query \(5\)/);
    assert.match(verdict('SELECT * FROM a, b, c WHERE EXISTS (SELECT 1 FROM d JOIN e ON true JOIN f ON true)', widgetco) ?? '', /6 tables/);
    assert.equal(verdict('SELECT * FROM a, a, a, b', widgetco), null);
  });

  test('system access: catalogs and admin functions', () => {
    assert.match(verdict('SELECT * FROM pg_stat_activity', widgetco) ?? '', /pg_stat_activity needs allow_system_access/);
    assert.match(verdict("SELECT set_config('work_mem', '1MB', false)", widgetco) ?? '', /set_config\(\) needs allow_system_access/);
    const sys: TenantRules = { ...widgetco, permissions: PermissionsSchema.parse({ allow_system_access: true }) };
    assert.equal(verdict('SELECT * FROM pg_stat_activity', sys), null);
  });
});

describe('literal normalisation for the verdict cache', () => {
  test('plain literals become ?', () => {
    assert.equal(normalizeLiterals("SELECT * FROM t WHERE a = 'x''y' AND b = 12.5e3 AND c = $1"), "SELECT * FROM t WHERE a = '?' AND b = ? AND c = $1");
  });
  test('gives up on anything it is not sure of', () => {
    for (const sql of ["SELECT E'\\''", "SELECT $$x$$", "SELECT U&'x'", "SELECT B'101'", 'SELECT 1abc', "SELECT 'a' \\ 'b'", '/* unterminated']) {
      assert.equal(normalizeLiterals(sql), null, sql);
    }
  });
  test('identifiers, comments and quoted names are never rewritten', () => {
    assert.equal(normalizeLiterals('SELECT t1.c2 FROM "x 1" -- 5\n'), 'SELECT t1.c2 FROM "x 1" -- 5\n');
  });
  test('multi-byte text: identifiers and literals in UTF-8, empty strings, doubled quotes', () => {
    assert.equal(normalizeLiterals("SELECT 'é''x' FROM tàble WHERE ünïcode = 5 AND s = ''"), "SELECT '?' FROM tàble WHERE ünïcode = ? AND s = '?'");
    assert.equal(normalizeLiterals('SELECT "a""b" FROM "sch""ema".t WHERE x = 1'), 'SELECT "a""b" FROM "sch""ema".t WHERE x = ?');
    assert.equal(normalizeLiterals("SELECT 1 /* it's /* nested */ 2 */ -- don't\nFROM t WHERE a = 'x'"), "SELECT ? /* it's /* nested */ 2 */ -- don't\nFROM t WHERE a = '?'");
    // Inside a plain literal a backslash is an ordinary character: the proxy holds standard_conforming_strings on.
    assert.equal(normalizeLiterals("SELECT 'a\\b'"), "SELECT '?'");
    assert.equal(normalizeLiterals('SELECT "unterminated'), null);
    assert.equal(normalizeLiterals("SELECT 'unterminated"), null);
  });
  test('a statement read from a message buffer at an offset gets the facts of the same text', () => {
    const c = new FactsCache();
    const sql = "SELECT * FROM acme.orders WHERE id = 42";
    const msg = Buffer.concat([Buffer.from('Q\0\0\0\0'), Buffer.from(sql), Buffer.from([0])]);
    const fromBytes = c.lookupText(msg, 5, msg.length - 1);
    assert.ok(Array.isArray(fromBytes));
    assert.deepEqual(fromBytes[0]!.relations, (cache.lookup(sql) as typeof fromBytes)[0]!.relations);
    // the same shape with another literal is a cache hit: the very same facts object
    const other = Buffer.from("SELECT * FROM acme.orders WHERE id = 7");
    assert.equal(c.lookupText(other, 0, other.length), fromBytes);
    // a text that is its own key (no literals, as in a Parse) is found straight from its bytes, and a key-shaped
    // text with a literal where the key has none is not mistaken for it
    const param = Buffer.from('SELECT * FROM acme.orders WHERE id = $1');
    const p1 = c.lookupText(param, 0, param.length);
    assert.equal(c.lookupText(param, 0, param.length), p1);
    const keyText = Buffer.from("SELECT * FROM acme.orders WHERE id = ?");
    assert.equal(c.lookupText(keyText, 0, keyText.length), fromBytes);
    const globex = Buffer.from('SELECT * FROM globex.orders WHERE id = $1');
    const g = c.lookupText(globex, 0, globex.length);
    assert.ok(Array.isArray(g) && g[0]!.relations[0]!.schema === 'globex');
  });
  test('statements that differ outside their literals never share facts, through eviction too', () => {
    const c = new FactsCache(20);
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 60; i++) {
        for (const schema of ['acme', 'globex']) {
          const r = c.lookup(`SELECT * FROM ${schema}.t${i} WHERE id = ${round * 1000 + i}`);
          assert.ok(Array.isArray(r));
          assert.deepEqual(r[0]!.relations.map((q) => `${q.schema}.${q.name}`), [`${schema}.t${i}`]);
        }
      }
      assert.ok(c.size <= 20, `cache holds ${c.size} entries`);
    }
    // schema-qualified vs quoted vs commented: each its own key
    assert.equal(verdictWith(c, 'SELECT * FROM acme.orders WHERE id = 1'), null);
    assert.equal(verdictWith(c, 'SELECT * FROM "globex".orders WHERE id = 1'), '42501');
    assert.equal(verdictWith(c, 'SELECT * FROM /* acme. */ globex.orders WHERE id = 1'), '42501');
    assert.equal(verdictWith(c, 'SELECT * FROM acme.orders WHERE id = 1; SELECT * FROM globex.orders'), '42501');
  });
  test('a line comment ends at \r as in PostgreSQL: what follows is SQL, not a literal to normalise away', () => {
    const c = new FactsCache();
    const shape = (rel: string): string => `SELECT 1 --\r, '\n' AS a FROM ${rel} --'\n`;
    assert.equal(verdictWith(c, shape('acme.orders')), null);
    assert.equal(verdictWith(c, shape('globex.secret')), '42501', 'must not reuse the facts of the acme text');
    assert.equal(normalizeLiterals("SELECT 1 -- x\rFROM t WHERE a = 'b'"), "SELECT ? -- x\rFROM t WHERE a = '?'");
  });
  test('U&"…" identifiers (whose UESCAPE literal changes the name) are never normalised', () => {
    const c = new FactsCache();
    assert.equal(normalizeLiterals(`SELECT * FROM U&"!0061cme" UESCAPE '!'.orders`), null);
    assert.equal(verdictWith(c, `SELECT * FROM U&"!0061cme" UESCAPE '!'.orders`), null);
    const other = c.lookup(`SELECT * FROM U&"!0061cme" UESCAPE '#'.orders`);
    assert.ok(Array.isArray(other));
    assert.notEqual(other[0]!.relations[0]!.schema, 'acme', 'another UESCAPE names another schema');
  });
  test('literal-dependent facts are not shared through the normalised key', () => {
    const c = new FactsCache();
    assert.equal(verdictWith(c, "SELECT nextval('acme.orders_id_seq')"), null);
    assert.notEqual(verdictWith(c, "SELECT nextval('newclient.orders_id_seq')"), null);
    assert.equal(verdictWith(c, "SELECT set_config('search_path', 'acme', false)"), '42501');
  });
});

function verdictWith(c: FactsCache, sql: string): string | null {
  const r = c.lookup(sql);
  if (r instanceof Error) return 'parse error';
  for (const f of r) {
    const v = checkStatement(f, acme);
    if (v !== null) return v.code;
  }
  return null;
}
