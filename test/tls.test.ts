// TLS: the proxy answers SSLRequest with 'S' and serves psql and node-postgres over TLS (sslmode=require
// and verify-full against a CA made at run time); mode = "require" refuses plaintext startups; and
// [backend_tls] encrypts the proxy's own connections to PostgreSQL.
import assert from 'node:assert/strict';
import { chownSync, copyFileSync, chmodSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import pg from 'pg';
import { testCerts, type TestCerts } from './helpers/certs.js';
import { runPsql, superQuery } from './helpers/pg.js';
import { direct, loginFails, startProxy, type TestProxy } from './helpers/proxy.js';

let certs: TestCerts;

function tlsToml(mode: string, extra = ''): (text: string) => string {
  return (text) => `${text}\n[tls]\ncert_file = ${JSON.stringify(certs.certFile)}\nkey_file = ${JSON.stringify(certs.keyFile)}\nmode = "${mode}"\n${extra}`;
}

describe('client TLS, mode = "allow"', () => {
  let p: TestProxy;
  before(async () => {
    certs = await testCerts();
    p = await startProxy({ toml: tlsToml('allow') });
  });
  after(() => p.close());

  it('psql with sslmode=verify-full sees an encrypted session', async () => {
    const r = await runPsql(
      ['-At', '-c', "SELECT current_schema()", `host=localhost port=${p.port} user=acme.appuser dbname=shared_db sslmode=verify-full sslrootcert=${certs.caFile}`],
      { PGPASSWORD: 'apppass' },
    );
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), 'acme');
    const info = await runPsql(['-c', '\\conninfo', `host=localhost port=${p.port} user=acme.appuser dbname=shared_db sslmode=require`], { PGPASSWORD: 'apppass' });
    assert.match(info.stdout, /SSL connection \(protocol: TLSv1\.[23]/);
  });

  it('node-postgres with ssl: { ca } (verify-full)', async () => {
    const c = new pg.Client({ ...p.clientConfig('acme.appuser', 'shared_db'), host: 'localhost', ssl: { ca: certs.ca, servername: 'localhost' } });
    await c.connect();
    try {
      assert.equal((await c.query<{ s: string }>('SELECT current_schema() AS s')).rows[0]!.s, 'acme');
    } finally {
      await c.end();
    }
  });

  it('verify-full fails against a CA that did not sign the certificate', async () => {
    const r = await runPsql(['-At', '-c', 'SELECT 1', `host=localhost port=${p.port} user=acme.appuser dbname=shared_db sslmode=verify-full sslrootcert=/etc/ssl/certs/ca-certificates.crt`], { PGPASSWORD: 'apppass' });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /certificate verify failed|SSL error/i);
  });

  it('plaintext still works in allow mode', async () => {
    const c = await p.connect('acme.appuser', 'shared_db');
    await c.end();
  });
});

describe('client TLS, mode = "require"', () => {
  let p: TestProxy;
  before(async () => {
    certs = await testCerts();
    p = await startProxy({ toml: tlsToml('require') });
  });
  after(() => p.close());

  it('a plaintext startup is refused with a clear FATAL', async () => {
    const f = await loginFails(p.clientConfig('acme.appuser', 'shared_db'));
    assert.equal(f.code, '28000');
    assert.match(f.message, /only TLS/);
    const r = await runPsql(['-At', '-c', 'SELECT 1', `host=127.0.0.1 port=${p.port} user=acme.appuser dbname=shared_db sslmode=disable`], { PGPASSWORD: 'apppass' });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /only TLS/);
  });

  it('sslmode=require works', async () => {
    const r = await runPsql(['-At', '-c', 'SELECT 1', `host=127.0.0.1 port=${p.port} user=acme.appuser dbname=shared_db sslmode=require`], { PGPASSWORD: 'apppass' });
    assert.equal(r.code, 0, r.stderr);
  });
});

describe('[backend_tls]', () => {
  before(async () => {
    certs = await testCerts();
    // Turn on TLS in the run's cluster: key and certificate in its data directory, owned by its OS user.
    const dataDir = await superQuery('SHOW data_directory');
    const owner = statSync(dataDir);
    for (const [from, to] of [[certs.certFile, 'helios-test.crt'], [certs.keyFile, 'helios-test.key']] as const) {
      copyFileSync(from, join(dataDir, to));
      chownSync(join(dataDir, to), owner.uid, owner.gid);
      chmodSync(join(dataDir, to), 0o600);
    }
    await superQuery("ALTER SYSTEM SET ssl_cert_file = 'helios-test.crt'; ALTER SYSTEM SET ssl_key_file = 'helios-test.key'; ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf()");
  });
  after(async () => {
    await superQuery('ALTER SYSTEM RESET ssl; ALTER SYSTEM RESET ssl_cert_file; ALTER SYSTEM RESET ssl_key_file; SELECT pg_reload_conf()');
  });

  for (const mode of ['require', 'verify-full'] as const) {
    it(`mode = "${mode}": the backend sees an SSL connection`, async () => {
      const p = await startProxy({
        toml: (t) => `${t}\n[backend_tls]\nmode = "${mode}"\nca_file = ${JSON.stringify(certs.caFile)}\n`,
        patch: (c) => {
          // verify-full checks the name in the certificate: localhost, not 127.0.0.1's reverse.
          c.nodes[0]!.host = 'localhost';
        },
      });
      try {
        const c = await p.connect('acme.appuser', 'shared_db');
        const r = await c.query<{ ssl: boolean }>('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()').catch(() => null);
        await c.end();
        const rows = await direct<{ n: string }>("SELECT count(*) AS n FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'appuser' AND s.ssl");
        assert.ok(Number(rows[0]!.n) >= 1 || r?.rows[0]?.ssl === true, 'no SSL backend connection for appuser');
      } finally {
        await p.close();
      }
    });
  }
});
