// Who a connection belongs to: username_prefix (with the reference and a custom separator), database_name,
// unknown tenants let through or auto-created, multi-tenancy off, and the startup parameters a client may
// (not) send. Real clients: node-postgres for SQLSTATEs, psql for what a newcomer types.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { runPsql, testPg } from './helpers/pg.js';
import { loginFails, newclientTenantToml, startProxy, type LoginFailure, type TestProxy } from './helpers/proxy.js';

const PASSWORD = 'apppass';

/** The "Adding a New Tenant" block of the scenario document. */

/** A TOML text edit that must apply (so a drifting reference file cannot turn a test into a no-op). */
function edit(text: string, from: string | RegExp, to: string): string {
  const out = text.replace(from, to);
  assert.notEqual(out, text, `TOML edit did not apply: ${String(from)}`);
  return out;
}
const setKey = (key: string, value: string) => (text: string): string => edit(text, new RegExp(`^${key}\\s*=.*$`, 'm'), `${key} = ${value}`);
const pipe = (...fns: ((t: string) => string)[]) => (text: string): string => fns.reduce((t, f) => f(t), text);



function assertRefused(f: LoginFailure, code: string, message: string | RegExp): void {
  assert.equal(f.code, code, `expected ${code}, got ${f.code}: ${f.message}`);
  assert.equal(f.severity, 'FATAL');
  if (typeof message === 'string') assert.equal(f.message, message);
  else assert.match(f.message, message);
}

interface Where {
  usr: string;
  db: string;
  sp: string;
  n: string;
}
/** Where a login lands: backend role, database, search_path and how many rows `orders` resolves to. */
async function whereAs(p: TestProxy, user: string, database?: string, opts: Partial<pg.ClientConfig> = {}): Promise<Where> {
  const c = new pg.Client({ ...p.clientConfig(user, database, PASSWORD), ...opts });
  await c.connect();
  try {
    const r = await c.query<Where>("SELECT current_user AS usr, current_database() AS db, current_setting('search_path') AS sp, (SELECT count(*) FROM orders)::text AS n");
    return r.rows[0]!;
  } finally {
    await c.end();
  }
}

async function scalar(p: TestProxy, user: string, database: string | undefined, sql: string, opts: Partial<pg.ClientConfig> = {}): Promise<string> {
  const c = new pg.Client({ ...p.clientConfig(user, database, PASSWORD), ...opts });
  await c.connect();
  try {
    const r = await c.query<Record<string, unknown>>(sql);
    const column = r.fields[0]?.name;
    assert.ok(column !== undefined, `no columns from ${sql}`);
    return String(r.rows[0]?.[column]);
  } finally {
    await c.end();
  }
}

function psql(p: TestProxy, user: string, db: string | null, sql: string, env: Record<string, string> = {}) {
  return runPsql(['-h', '127.0.0.1', '-p', String(p.port), '-U', user, ...(db !== null ? ['-d', db] : []), '-At', '-v', 'ON_ERROR_STOP=1', '-c', sql], { PGPASSWORD: PASSWORD, ...env });
}

describe('username_prefix identification (the reference)', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy();
  });
  after(() => p.close());

  test('acme.appuser -d shared_db: schema tenant in shared_db with search_path acme', async () => {
    assert.deepEqual(await whereAs(p, 'acme.appuser', 'shared_db'), { usr: 'appuser', db: 'shared_db', sp: 'acme, public', n: '3' });
  });

  test('-d acme and -d acme_db are aliases that route to shared_db', async () => {
    for (const db of ['acme', 'acme_db']) {
      assert.deepEqual(await whereAs(p, 'acme.appuser', db), { usr: 'appuser', db: 'shared_db', sp: 'acme, public', n: '3' }, db);
    }
    const r = await psql(p, 'acme.appuser', 'acme_db', 'SELECT current_database()');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'shared_db');
  });

  test('widgetco aliases route to widgetco_db', async () => {
    for (const db of ['widgetco_db', 'widgetco']) {
      const w = await whereAs(p, 'widgetco.appuser', db);
      assert.equal(w.db, 'widgetco_db', db);
      assert.equal(w.n, '2');
    }
  });

  test('another tenant\'s database is refused: 42501 permission denied', async () => {
    assertRefused(await loginFails(p.clientConfig('acme.appuser', 'widgetco_db')), '42501', 'permission denied for database "widgetco_db"');
    assertRefused(await loginFails(p.clientConfig('widgetco.appuser', 'shared_db')), '42501', 'permission denied for database "shared_db"');
    assertRefused(await loginFails(p.clientConfig('acme.appuser', 'postgres')), '42501', 'permission denied for database "postgres"');
    const r = await psql(p, 'acme.appuser', 'widgetco_db', 'SELECT 1');
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /FATAL: {2}permission denied for database "widgetco_db"/);
  });

  test('database omitted: the tenant\'s own database (node-postgres and psql)', async () => {
    // node-postgres and libpq both send the user name as the database when none is given.
    assert.deepEqual(await whereAs(p, 'acme.appuser'), { usr: 'appuser', db: 'shared_db', sp: 'acme, public', n: '3' });
    assert.equal((await whereAs(p, 'widgetco.appuser')).db, 'widgetco_db');
    const r = await psql(p, 'acme.appuser', null, 'SELECT current_database() || \' \' || current_setting(\'search_path\')');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'shared_db acme, public');
  });

  test('unknown tenant: 28000 unknown tenant "x"', async () => {
    assertRefused(await loginFails(p.clientConfig('x.appuser', 'shared_db')), '28000', 'unknown tenant "x"');
    assertRefused(await loginFails(p.clientConfig('ACME.appuser', 'shared_db')), '28000', 'unknown tenant "ACME"');
    const r = await psql(p, 'x.appuser', 'shared_db', 'SELECT 1');
    assert.match(r.stderr, /FATAL: {2}unknown tenant "x"/);
  });

  test('no separator, or an empty tenant or role: 28000', async () => {
    for (const user of ['appuser', 'acme.', '.appuser']) {
      assertRefused(await loginFails(p.clientConfig(user, 'shared_db')), '28000', `user "${user}" does not name a tenant`);
    }
  });
});

describe('username_prefix with separator "__"', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ toml: setKey('separator', '"__"') });
  });
  after(() => p.close());

  test('acme__appuser is tenant acme, role appuser', async () => {
    assert.deepEqual(await whereAs(p, 'acme__appuser', 'shared_db'), { usr: 'appuser', db: 'shared_db', sp: 'acme, public', n: '3' });
    assert.equal((await whereAs(p, 'widgetco__appuser')).db, 'widgetco_db');
  });

  test('acme.appuser no longer names a tenant; the hint shows the separator', async () => {
    const f = await loginFails(p.clientConfig('acme.appuser', 'shared_db'));
    assertRefused(f, '28000', 'user "acme.appuser" does not name a tenant');
    assert.match(f.detail ?? '', /acme__appuser/);
  });

  test('unknown tenant with the custom separator', async () => {
    assertRefused(await loginFails(p.clientConfig('x__appuser', 'shared_db')), '28000', 'unknown tenant "x"');
  });
});

describe('database_name identification', () => {
  describe('acme and widgetco only', () => {
    let p: TestProxy;
    before(async () => {
      p = await startProxy({ toml: setKey('method', '"database_name"') });
    });
    after(() => p.close());

    test('-U appuser -d widgetco_db: tenant widgetco', async () => {
      assert.deepEqual(await whereAs(p, 'appuser', 'widgetco_db'), { usr: 'appuser', db: 'widgetco_db', sp: '"$user", public', n: '2' });
    });

    test('-U appuser -d acme_db: tenant acme in shared_db with search_path acme', async () => {
      assert.deepEqual(await whereAs(p, 'appuser', 'acme_db'), { usr: 'appuser', db: 'shared_db', sp: 'acme, public', n: '3' });
      const r = await psql(p, 'appuser', 'acme_db', 'SELECT customer FROM orders ORDER BY id');
      assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(r.stdout.trim().split('\n'), ['acme-customer-1', 'acme-customer-2', 'acme-customer-3']);
    });

    test('-d shared_db names only acme while acme is its only tenant', async () => {
      assert.equal((await whereAs(p, 'appuser', 'shared_db')).sp, 'acme, public');
    });

    test('an unknown database: 28000', async () => {
      const f = await loginFails(p.clientConfig('appuser', 'nosuch_db'));
      assertRefused(f, '28000', /nosuch_db/);
    });

    test('no database given: 28000', async () => {
      // node-postgres sends the user name as the database, which means "none given".
      assertRefused(await loginFails(p.clientConfig('appuser')), '28000', /no database given/);
    });
  });

  describe('with the scenario\'s newclient tenant also in shared_db', () => {
    let p: TestProxy;
    before(async () => {
      p = await startProxy({ toml: (t) => setKey('method', '"database_name"')(t) + newclientTenantToml() });
    });
    after(() => p.close());

    test('-d shared_db is ambiguous: refused with 28000', async () => {
      assertRefused(await loginFails(p.clientConfig('appuser', 'shared_db')), '28000', /database "shared_db" is shared by several tenants/);
    });

    test('each tenant\'s own name still identifies it', async () => {
      assert.deepEqual(await whereAs(p, 'appuser', 'newclient_db'), { usr: 'appuser', db: 'shared_db', sp: 'newclient, public', n: '2' });
      assert.deepEqual(await whereAs(p, 'appuser', 'acme'), { usr: 'appuser', db: 'shared_db', sp: 'acme, public', n: '3' });
      assert.equal((await whereAs(p, 'appuser', 'widgetco_db')).db, 'widgetco_db');
    });
  });
});

describe('allow_unknown_tenants = true', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ toml: setKey('allow_unknown_tenants', 'true') });
  });
  after(() => p.close());

  test('-U appuser -d shared_db (no separator) goes through as appuser with the default search_path', async () => {
    // A tenant's connection first, so the pooled backend carries search_path acme: it must not leak.
    assert.equal((await whereAs(p, 'acme.appuser', 'shared_db')).sp, 'acme, public');
    const r = await scalar(p, 'appuser', 'shared_db', "SELECT current_user || '|' || current_database() || '|' || current_setting('search_path')");
    assert.equal(r, 'appuser|shared_db|"$user", public');
    const s = await psql(p, 'appuser', 'shared_db', 'SHOW search_path');
    assert.equal(s.code, 0, s.stderr);
    assert.equal(s.stdout.trim(), '"$user", public');
  });

  test('-U nobody.appuser goes through as role appuser', async () => {
    const r = await scalar(p, 'nobody.appuser', 'shared_db', "SELECT current_user || '|' || current_setting('search_path')");
    assert.equal(r, 'appuser|"$user", public');
  });

  test('known tenants keep their isolation', async () => {
    assert.equal((await whereAs(p, 'acme.appuser', 'shared_db')).sp, 'acme, public');
    assertRefused(await loginFails(p.clientConfig('acme.appuser', 'widgetco_db')), '42501', 'permission denied for database "widgetco_db"');
  });

  test('a wrong password is still refused', async () => {
    assertRefused(await loginFails(p.clientConfig('appuser', 'shared_db', 'wrong')), '28P01', 'password authentication failed for user "appuser"');
  });
});

const AUTO_CREATE = pipe(
  setKey('auto_create_tenants', 'true'),
  setKey('max_tenants', '3'),
  (t) => `${t}\n[multi_tenancy.defaults.isolation]\nstrategy = "schema"\ndatabase_name = "shared_db"\n`,
);

interface AdminTenant {
  id: string;
  origin: string;
  isolation: { strategy: string; database: string; schema: string | null };
}
async function adminTenants(p: TestProxy): Promise<AdminTenant[]> {
  const res = await fetch(`http://127.0.0.1:${p.adminPort}/tenants`);
  assert.equal(res.status, 200);
  return ((await res.json()) as { tenants: AdminTenant[] }).tenants;
}

describe('auto_create_tenants = true with [multi_tenancy.defaults.isolation]', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ toml: AUTO_CREATE, admin: true });
  });
  after(() => p.close());

  test('newclient.appuser creates tenant newclient: schema newclient in shared_db', async () => {
    assert.deepEqual(await whereAs(p, 'newclient.appuser', 'shared_db'), { usr: 'appuser', db: 'shared_db', sp: 'newclient, public', n: '2' });
    const r = await psql(p, 'newclient.appuser', null, 'SELECT customer FROM orders ORDER BY id');
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split('\n'), ['newclient-customer-1', 'newclient-customer-2']);
  });

  test('the auto-created tenant shows in the admin API', async () => {
    const tenants = await adminTenants(p);
    assert.deepEqual(tenants.map((t) => t.id).sort(), ['acme', 'newclient', 'widgetco']);
    const nc = tenants.find((t) => t.id === 'newclient')!;
    assert.equal(nc.origin, 'auto');
    assert.deepEqual(nc.isolation, { strategy: 'schema', database: 'shared_db', schema: 'newclient' });
    const one = await fetch(`http://127.0.0.1:${p.adminPort}/tenants/newclient`);
    assert.equal(one.status, 200);
  });

  test('max_tenants caps creation: the next new id is refused with 53300', async () => {
    assertRefused(await loginFails(p.clientConfig('another.appuser', 'shared_db')), '53300', /max_tenants \(3\)/);
    assert.equal((await adminTenants(p)).length, 3);
    // Existing tenants are unaffected.
    assert.equal((await whereAs(p, 'newclient.appuser', 'shared_db')).n, '2');
    assert.equal((await whereAs(p, 'acme.appuser', 'shared_db')).n, '3');
  });
});

describe('auto_create_tenants: only a login that succeeds may create a tenant', () => {
  const withProxy = async (fn: (p: TestProxy) => Promise<void>): Promise<void> => {
    const p = await startProxy({ toml: AUTO_CREATE, admin: true });
    try {
      await fn(p);
    } finally {
      await p.close();
    }
  };
  const ids = async (p: TestProxy): Promise<string[]> => (await adminTenants(p)).map((t) => t.id).sort();

  test('a wrong password creates no tenant and uses no max_tenants slot', () =>
    withProxy(async (p) => {
      assertRefused(await loginFails(p.clientConfig('ghost.appuser', 'shared_db', 'wrong')), '28P01', 'password authentication failed for user "ghost.appuser"');
      assert.deepEqual(await ids(p), ['acme', 'widgetco']);
      assert.equal((await whereAs(p, 'newclient.appuser', 'shared_db')).n, '2');
    }));

  test('a refused database creates no tenant and uses no max_tenants slot', () =>
    withProxy(async (p) => {
      assertRefused(await loginFails(p.clientConfig('ghost.appuser', 'widgetco_db')), '42501', 'permission denied for database "widgetco_db"');
      assert.deepEqual(await ids(p), ['acme', 'widgetco']);
      assert.equal((await whereAs(p, 'newclient.appuser', 'shared_db')).n, '2');
    }));
});

describe('multi_tenancy.enabled = false: a plain pooler', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ toml: (t) => edit(t, /^(\[multi_tenancy\]\s*\n)enabled\s*=\s*true/m, '$1enabled = false') });
  });
  after(() => p.close());

  test('-U appuser -d widgetco_db works', async () => {
    assert.deepEqual(await whereAs(p, 'appuser', 'widgetco_db'), { usr: 'appuser', db: 'widgetco_db', sp: '"$user", public', n: '2' });
    const r = await psql(p, 'appuser', 'widgetco_db', 'SELECT count(*) FROM orders');
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), '2');
  });

  test('-U appuser -d shared_db gets no tenant search_path', async () => {
    assert.equal(await scalar(p, 'appuser', 'shared_db', "SELECT current_setting('search_path')"), '"$user", public');
  });
});

describe('startup parameters', () => {
  let p: TestProxy;
  before(async () => {
    p = await startProxy();
  });
  after(() => p.close());

  test('PGOPTIONS="-c search_path=newclient" is refused: 08P01 unsupported startup parameter', async () => {
    const r = await psql(p, 'acme.appuser', 'shared_db', 'SELECT 1', { PGOPTIONS: '-c search_path=newclient' });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /FATAL: {2}unsupported startup parameter: search_path/);
    assertRefused(await loginFails({ ...p.clientConfig('acme.appuser', 'shared_db'), options: '-c search_path=newclient' }), '08P01', 'unsupported startup parameter: search_path');
  });

  test('other isolation-breaking parameters are refused too', async () => {
    assertRefused(await loginFails({ ...p.clientConfig('acme.appuser', 'shared_db'), options: '-c role=postgres' }), '08P01', 'unsupported startup parameter: role');
    assertRefused(await loginFails({ ...p.clientConfig('acme.appuser', 'shared_db'), options: '--session_authorization=postgres' }), '08P01', 'unsupported startup parameter: session_authorization');
  });

  test('PGOPTIONS="-c statement_timeout=5s" is accepted and applied', async () => {
    const r = await psql(p, 'acme.appuser', 'shared_db', 'SHOW statement_timeout', { PGOPTIONS: '-c statement_timeout=5s' });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), '5s');
    assert.equal(await scalar(p, 'acme.appuser', 'shared_db', 'SHOW statement_timeout', { options: '-c statement_timeout=5s' }), '5s');
    // …and does not follow the backend connection to the next client.
    assert.equal(await scalar(p, 'acme.appuser', 'shared_db', 'SHOW statement_timeout'), '0');
  });

  test('a backslash-escaped space in options belongs to the value, as libpq documents', async () => {
    // libpq: spaces in options separate arguments "unless escaped with a backslash (\\)".
    const db = testPg();
    const direct = await runPsql(['-h', db.host, '-p', String(db.port), '-U', 'appuser', '-d', 'shared_db', '-At', '-c', 'SHOW datestyle'], { PGPASSWORD: PASSWORD, PGOPTIONS: '-c datestyle=SQL,\\ DMY' });
    assert.equal(direct.stdout.trim(), 'SQL, DMY', `PostgreSQL itself: ${direct.stderr}`);
    const r = await psql(p, 'acme.appuser', 'shared_db', 'SHOW datestyle', { PGOPTIONS: '-c datestyle=SQL,\\ DMY' });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'SQL, DMY');
  });

  test('replication=database is refused', async () => {
    const r = await runPsql(['-At', '-c', 'SELECT 1', `host=127.0.0.1 port=${p.port} user=acme.appuser dbname=shared_db replication=database`], { PGPASSWORD: PASSWORD });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /FATAL: {2}replication connections are not supported/);
    const cfg: pg.ClientConfig & { replication: string } = { ...p.clientConfig('acme.appuser', 'shared_db'), replication: 'database' };
    const f = await loginFails(cfg);
    assert.equal(f.code, '08P01');
    assert.match(f.message, /replication/);
  });
});
