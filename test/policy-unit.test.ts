// The statement classifier and per-tenant check as pure functions: a table of schema-isolation escape
// attempts that must all be refused, statements drivers and apps send that must pass, and the permission
// rules of the reference tenants. The wire-level behaviour is tested in guardrails.test.ts.
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { normalizeLiterals, FactsCache } from '../src/policy/cache.js';
import { classify, loadParser, ParseFailure } from '../src/policy/classify.js';
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

// A differential hunt for normaliser/lexer disagreements. Texts are generated from fragments that stress the
// lexer (comments ending at \n, \r or the end, nested block comments with quotes in them, quoted names with ""
// inside, literals holding comment markers, quotes, $$, \r, the other tenant's schema…). For each text T with a
// key K, T' gets different literal values at exactly the spans the normaliser replaced (recovered by aligning T
// with K), so normalizeLiterals(T') must be K; then PostgreSQL's parser must give T and T' the same facts unless
// literalsMatter, and a cache that saw T first must answer T' with T''s own facts.
describe('verdict cache: texts sharing a literal-free key share their facts (generated, differential)', () => {
  /** mulberry32: small, fast, deterministic. */
  function prng(seed: number): () => number {
    let a = seed >>> 0;
    return () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  // No '?' anywhere in generated texts: a '?' in the key then always marks a replaced literal.
  const CONTENTS = [
    '', 'x', "it's", "''", '--', '-- globex.secret', '/*', '*/', '/* x', '*/ globex.secret /*', '\r', '\n', '\r\n', '\r, globex.secret',
    '$', '$$', '$1', '$q$', '"', '""', '"globex"', '\\', "\\'", 'U&', 'E', "E'", ';', '; SELECT * FROM globex.secret', 'globex',
    'globex.secret', 'acme.orders', '"globex".secret', "' || (SELECT 1 FROM globex.secret) || '", 'é', 'acme', 'search_path',
    // Shaped as [end of a token] SQL [start of a token]: what a span the normaliser mis-lexed as one literal holds.
    ' FROM globex.secret --', ' AS a FROM globex.secret --', ', 1 FROM globex.secret --', '*/ FROM globex.secret /*',
    ' FROM globex.secret; SELECT --', '" FROM globex.secret --', ' FROM globex.secret WHERE a = ',
  ];
  const NUMBERS = ['1', '1.5', '.5', '1e3', '1.5E-3', '0', '42', '10.', '7e+2'];
  const DOT_NUMBERS = ['.5', '.25e2', '.0', '.5E-3'];
  const sqlString = (s: string): string => `'${s.replaceAll("'", "''")}'`;

  function generator(rnd: () => number) {
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
    const chance = (p: number): boolean => rnd() < p;
    const schema = (): string => pick(['acme', 'globex']);
    const rel = (): string =>
      pick([
        () => `${schema()}.orders`,
        () => `"${schema()}".orders`,
        () => `${schema()}."or""ders"`,
        () => `${schema().toUpperCase()}.t1`,
        () => `${schema()} . orders`,
        () => `"${schema()}"."we""ird"`,
        () => 'orders',
        () => `${schema()}.${schema()}.orders`,
        () => `U&"!0061${pick(['cme', 'globex'])}" UESCAPE ${sqlString(pick(['!', '#']))}.orders`,
      ])();
    const str = (): string => (chance(0.1) ? `${sqlString(pick(CONTENTS))}\n${sqlString(pick(CONTENTS))}` : sqlString(pick(CONTENTS)));
    const num = (): string => pick(NUMBERS);
    const lit = (): string => (chance(0.6) ? str() : num());
    const junk = (): string => {
      let s = '';
      for (let n = Math.floor(rnd() * 4); n > 0; n--) {
        s += pick<() => string>([() => "'", () => '"', () => 'x', () => ' ', str, num, rel, () => '*', () => '/', () => '-', () => '$$', () => ';', () => '\r', () => '\n', () => ','])();
      }
      return s;
    };
    const sep = (): string =>
      pick<() => string>([
        () => ' ', () => ' ', () => ' ', () => ' ', () => ' ', () => ' ', () => '\n', () => '\r', () => '\t', () => '\r\n', () => '',
        () => ` --${junk()}\n`,
        () => ` --${junk()}\r`,
        () => ` --${pick(["'", '', "x'"])}\r`,
        () => `/*${junk()}*/`,
        () => `/* /*${junk()}*/ ${junk()} */`,
      ])();
    const expr = (): string => pick<() => string>([() => '*', () => 'a', () => `${schema()}.orders.a`, lit, () => `${lit()} || ${lit()}`, () => `"a""b"`])();
    const statements: (() => string[])[] = [
      () => ['SELECT', expr(), 'FROM', rel(), 'WHERE', 'id', '=', lit()],
      () => ['SELECT', num(), ',', lit(), 'AS', 'a', 'FROM', rel()],
      () => ['WITH', 'x', 'AS', '(', 'SELECT', '*', 'FROM', rel(), 'WHERE', 'a', '=', lit(), ')', 'SELECT', '*', 'FROM', 'x'],
      () => ['INSERT', 'INTO', rel(), '(', 'a', ',', 'b', ')', 'VALUES', '(', lit(), ',', lit(), ')'],
      () => ['UPDATE', rel(), 'SET', 'a', '=', lit(), 'WHERE', 'id', '=', '$1'],
      () => ['DELETE', 'FROM', rel(), 'WHERE', 'a', '=', lit(), 'RETURNING', '*'],
      // Statements whose facts read a literal (literalsMatter): one slot, so that they do not crowd out the rest.
      () =>
        pick([
          () => ['SELECT', `${str()}::regclass`, ',', lit()],
          () => ['SELECT', 'CAST', '(', str(), 'AS', 'regclass', ')'],
          () => ['SELECT', 'nextval', '(', str(), ')'],
          () => ['SELECT', 'set_config', '(', "'search_path'", ',', str(), ',', 'false', ')'],
          () => ['SET', 'search_path', '=', str()],
          () => ['ALTER', 'FUNCTION', `${schema()}.f`, '(', ')', 'SET', 'search_path', '=', str()],
        ])(),
      () => ['PREPARE', 'p', 'AS', 'SELECT', '*', 'FROM', rel(), 'WHERE', 'a', '=', '$1', 'AND', 'b', '=', lit()],
      () => ['EXPLAIN', 'SELECT', lit(), 'FROM', rel()],
      () => ['SELECT', `E${str()}`, ',', '$$a$$', ',', lit(), 'FROM', rel()],
      () => ['SELECT', '*', 'FROM', rel(), 'LIMIT', num(), 'OFFSET', '$1'],
      () => ['SELECT', `${schema()}.f`, '(', lit(), ',', '$2', ')'],
      () => ['SELECT', '"a""b"', ',', lit(), '::', 'text', 'FROM', rel()],
      () => ['SELECT', lit(), 'FROM', rel(), 'JOIN', rel(), 'USING', '(', 'id', ')'],
      () => ['SELECT', 'x', 'FROM', rel(), 'WHERE', 'x', 'IN', '(', lit(), ',', lit(), ')'],
    ];
    return (): string => {
      let text = chance(0.2) ? sep() : '';
      for (let n = pick([1, 1, 1, 2, 2, 3]), first = true; n > 0; n--, first = false) {
        if (!first) text += `;${sep()}`;
        const tokens = pick(statements)();
        text += tokens.map((t, i) => (i === 0 ? t : sep() + t)).join('');
      }
      if (chance(0.3)) text += sep();
      // A line comment the end of text closes; a quote in it evens out the quotes of a text mis-lexed before.
      if (chance(0.3)) text += `--${pick<() => string>([junk, () => "'", () => `${junk()}'`])()}`;
      return text;
    };
  }

  // The normaliser's own literal rules, to find the spans it replaced.
  const isDigitChar = (ch: string | undefined): boolean => ch !== undefined && ch >= '0' && ch <= '9';
  function numberEnd(t: string, i: number): number {
    let j = i;
    while (isDigitChar(t[j]) || t[j] === '.') j++;
    if (t[j] === 'e' || t[j] === 'E') {
      let k = j + 1;
      if (t[k] === '+' || t[k] === '-') k++;
      if (isDigitChar(t[k])) {
        j = k;
        while (isDigitChar(t[j])) j++;
      }
    }
    return j;
  }
  function stringEnd(t: string, i: number): number {
    for (let j = i + 1; j < t.length; ) {
      if (t[j] !== "'") j++;
      else if (t[j + 1] === "'") j += 2;
      else return j + 1;
    }
    return -1;
  }
  /** Where the normaliser replaced literals in `t` to make `key`: null if the two do not align. */
  function literalSpans(t: string, key: string): { start: number; end: number; kind: 'string' | 'number' }[] | null {
    const spans: { start: number; end: number; kind: 'string' | 'number' }[] = [];
    let i = 0;
    let k = 0;
    while (i < t.length || k < key.length) {
      if (key.startsWith("'?'", k) && t[i] === "'") {
        const end = stringEnd(t, i);
        if (end < 0) return null;
        spans.push({ start: i, end, kind: 'string' });
        i = end;
        k += 3;
      } else if (key[k] === '?') {
        const end = numberEnd(t, i);
        if (end === i) return null;
        spans.push({ start: i, end, kind: 'number' });
        i = end;
        k++;
      } else if (i < t.length && t[i] === key[k]) {
        i++;
        k++;
      } else return null;
    }
    return spans;
  }

  type Facts = ReturnType<typeof classify>;
  function facts(sql: string): Facts | null {
    try {
      return classify(sql);
    } catch (err) {
      if (err instanceof ParseFailure) return null;
      throw err;
    }
  }
  const literalsMatter = (fs: Facts): boolean => fs.some((f) => f.literalsMatter);

  test('thousands of generated texts and literal variants: same key ⇒ same facts unless literalsMatter', () => {
    // CACHE_FUZZ_SEED / CACHE_FUZZ_TEXTS run a longer hunt; the defaults keep this test around 2 s.
    const rnd = prng(Number(process.env.CACHE_FUZZ_SEED ?? 0x5eed2024));
    const next = generator(rnd);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
    const stats = { texts: Number(process.env.CACHE_FUZZ_TEXTS ?? 3000), keyed: 0, variants: 0, bothParse: 0, compared: 0, literalsMatter: 0 };
    for (let n = 0; n < stats.texts; n++) {
      const text = next();
      assert.ok(!text.includes('?'));
      const key = normalizeLiterals(text);
      if (key === null) continue;
      stats.keyed++;
      const spans = literalSpans(text, key);
      assert.ok(spans !== null, `key does not align with its text: ${JSON.stringify(text)} → ${JSON.stringify(key)}`);
      if (spans.length === 0) continue;
      const original = facts(text);
      // Variant 0 swaps acme ⇄ globex inside every string span and keeps the rest of it: a span that is truly one
      // literal does not care, and one the normaliser mis-lexed holds SQL whose schema then changes while the text
      // still parses. The others put fresh values from the pools in.
      for (let v = 0; v < 3; v++) {
        let variant = '';
        let at = 0;
        for (const s of spans) {
          // A number glued to a name, $n or another number starts with its '.' (t.5, $1.5, 1e3.5), and one glued to a
          // following '.' ends in an exponent: only numbers of the same shape keep the lexer's split where it was.
          const glued = s.start > 0 && /[\w$\u0080-\uffff]/.test(text[s.start - 1]!);
          const numbers = (glued ? DOT_NUMBERS : NUMBERS).filter((x) => text[s.end] !== '.' || /e/i.test(x));
          const swapped = text.slice(s.start, s.end).replace(/acme|globex/gi, (m) => (m.toLowerCase() === 'acme' ? 'globex' : 'acme'));
          variant += text.slice(at, s.start) + (s.kind === 'number' ? pick(numbers) : v === 0 ? swapped : sqlString(pick(CONTENTS)));
          at = s.end;
        }
        variant += text.slice(at);
        if (variant === text) continue;
        stats.variants++;
        const where: string = `\n  T  = ${JSON.stringify(text)}\n  T' = ${JSON.stringify(variant)}\n  K  = ${JSON.stringify(key)}`;
        assert.equal(normalizeLiterals(variant), key, `a literal-only change moved the key:${where}`);
        const changed = facts(variant);
        if (original !== null && changed !== null) {
          stats.bothParse++;
          assert.equal(literalsMatter(changed), literalsMatter(original), `literalsMatter differs between texts that share a key:${where}`);
          if (!literalsMatter(original)) {
            stats.compared++;
            assert.deepStrictEqual(changed, original, `texts that share a key have different facts:${where}`);
          } else stats.literalsMatter++;
        }
        // Through the cache: T first, then T' must get facts equal to its own.
        if (changed !== null) {
          const c = new FactsCache();
          c.lookup(text);
          assert.deepStrictEqual(c.lookup(variant), changed, `the cache answered T' with other facts:${where}`);
        }
      }
    }
    // Not vacuous: most texts get a key, and most keyed pairs get compared.
    assert.ok(stats.keyed > stats.texts / 3, JSON.stringify(stats));
    assert.ok(stats.compared > stats.texts / 2, JSON.stringify(stats));
    assert.ok(stats.literalsMatter > stats.texts / 20, JSON.stringify(stats));
  });

  test(
    'SET inside ALTER FUNCTION reads its literal: the cache must not share the verdict',
    () => {
      const dbco: TenantRules = { id: 'dbco', allowedSchemas: null, permissions: PermissionsSchema.parse({ allow_ddl: true, allow_system_access: false }) };
      const ok = "ALTER FUNCTION f() SET client_encoding = 'UTF8'";
      const bad = "ALTER FUNCTION f() SET client_encoding = 'LATIN1'";
      assert.equal(normalizeLiterals(ok), normalizeLiterals(bad));
      const fresh = classify(bad);
      assert.ok(checkStatement(fresh[0]!, dbco) !== null, 'refused when classified on its own');
      const c = new FactsCache();
      c.lookup(ok);
      const cached = c.lookup(bad);
      assert.ok(Array.isArray(cached));
      assert.ok(checkStatement(cached[0]!, dbco) !== null, 'must be refused after the UTF8 text was cached too');
    },
  );
});
