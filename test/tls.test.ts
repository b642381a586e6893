// TLS: the proxy answers SSLRequest with 'S' and serves psql and node-postgres over TLS (sslmode=require
// and verify-full against a CA made at run time); mode = "require" refuses plaintext startups; and
// [backend_tls] encrypts the proxy's own connections to PostgreSQL.
// Also, byte by byte on a raw socket: plaintext smuggled behind an SSLRequest is refused, GSSENCRequest is
// answered 'N', garbage instead of a ClientHello ends only that connection; mode = "disable" answers 'N';
// a reload serves a renewed certificate (wire and HTTPS admin); and from a non-loopback address, cleartext
// secrets (passthrough passwords, JWTs) are accepted over TLS only.
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { chownSync, copyFileSync, chmodSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { networkInterfaces, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { SignJWT } from 'jose';
import pg from 'pg';
import { GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, startupMessage } from '../src/protocol/messages.js';
import { ProxyServer, silentLogger } from '../src/server.js';
import { testCerts, type TestCerts } from './helpers/certs.js';
import { runPsql, superQuery } from './helpers/pg.js';
import { direct, eventually, loadTestConfig, loginFails, startFromFile, startProxy, writeConfigFile, type TestProxy } from './helpers/proxy.js';

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

// ── raw wire helpers ─────────────────────────────────────────────────────────────────

function request8(code: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeInt32BE(8, 0);
  b.writeInt32BE(code, 4);
  return b;
}
const SSL_REQUEST = request8(SSL_REQUEST_CODE);
const GSSENC_REQUEST = request8(GSSENC_REQUEST_CODE);

/** A raw client socket that collects what the proxy sends and knows when it closed. */
class Wire {
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  closed = false;
  private constructor(readonly socket: Socket) {
    socket.on('data', (c: Buffer) => {
      this.buf = Buffer.concat([this.buf, c]);
      this.wake();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
  }
  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }
  static open(port: number, host = '127.0.0.1'): Promise<Wire> {
    return new Promise((resolve, reject) => {
      const s = netConnect({ host, port }, () => resolve(new Wire(s)));
      s.once('error', reject);
    });
  }
  /** The next `n` bytes (the proxy's one-byte answers to SSLRequest/GSSENCRequest). */
  async read(n: number, ms = 3000): Promise<Buffer> {
    const until = Date.now() + ms;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed after ${this.buf.length} of ${n} bytes`);
      if (Date.now() > until) throw new Error('timed out reading from the proxy');
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  /** Everything until the proxy closes the connection (fails if it does not within `ms`). */
  async untilClosed(ms = 3000): Promise<Buffer> {
    await eventually(() => this.closed, ms, 'the proxy to close the connection');
    return this.buf;
  }
  /** Hands the socket to TLS (after 'S') trusting the test CA; resolves once the handshake is done. */
  startTls(): Promise<TLSSocket> {
    return new Promise((resolve, reject) => {
      const t = tlsConnect({ socket: this.socket, ca: certs.ca, servername: 'localhost' }, () => resolve(t));
      t.once('error', reject);
    });
  }
}

function fingerprint(file: string): string {
  return new X509Certificate(readFileSync(file)).fingerprint256;
}

/** SSLRequest, 'S', TLS handshake: the certificate the proxy presents on its PostgreSQL port. */
async function servedCertificate(port: number): Promise<string> {
  const w = await Wire.open(port);
  w.socket.write(SSL_REQUEST);
  assert.equal((await w.read(1)).toString(), 'S');
  const t = await w.startTls();
  const fp = t.getPeerCertificate().fingerprint256;
  t.destroy();
  return fp;
}

/** The certificate an HTTPS listener (admin_tls) presents. */
function httpsCertificate(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const t = tlsConnect({ host: '127.0.0.1', port, ca: certs.ca, servername: 'localhost' }, () => {
      resolve(t.getPeerCertificate().fingerprint256);
      t.destroy();
    });
    t.once('error', reject);
  });
}

describe('client TLS: the handshake on a raw socket', () => {
  let p: TestProxy;
  before(async () => {
    certs = await testCerts();
    p = await startProxy({ toml: tlsToml('allow') });
  });
  after(() => p.close());
  const startup = startupMessage({ user: 'acme.appuser', database: 'shared_db' });

  it('a StartupMessage sent with the SSLRequest in one packet is refused, never answered S', async () => {
    const w = await Wire.open(p.port);
    w.socket.write(Buffer.concat([SSL_REQUEST, startup]));
    const got = await w.untilClosed();
    assert.equal(String.fromCharCode(got[0]!), 'E', `first byte ${JSON.stringify(got.subarray(0, 1).toString())}`);
    assert.match(got.toString('latin1'), /08P01/);
    assert.match(got.toString('latin1'), /unencrypted data after SSL request/);
    await eventually(() => p.proxy.ctx.sessions.size === 0, 2000, 'the session to end');
  });

  it("GSSENCRequest is answered 'N'; the plaintext startup or an SSLRequest may follow", async () => {
    let w = await Wire.open(p.port);
    w.socket.write(GSSENC_REQUEST);
    assert.equal((await w.read(1)).toString(), 'N');
    w.socket.write(startup);
    const auth = await w.read(9);
    assert.equal(String.fromCharCode(auth[0]!), 'R', 'an authentication request follows the plaintext startup');
    w.socket.destroy();

    // What libpq does with gssencmode=prefer sslmode=require: GSSENCRequest, 'N', SSLRequest, 'S', TLS.
    w = await Wire.open(p.port);
    w.socket.write(GSSENC_REQUEST);
    assert.equal((await w.read(1)).toString(), 'N');
    w.socket.write(SSL_REQUEST);
    assert.equal((await w.read(1)).toString(), 'S');
    const t = await w.startTls();
    assert.equal(t.authorized, true);
    assert.equal(t.getPeerCertificate().fingerprint256, fingerprint(certs.certFile));
    const answer = await new Promise<Buffer>((resolve) => {
      t.once('data', resolve);
      t.write(startup);
    });
    assert.equal(String.fromCharCode(answer[0]!), 'R', 'the startup over TLS gets an authentication request');
    t.destroy();
    await eventually(() => p.proxy.ctx.sessions.size === 0, 2000, 'the sessions to end');
  });

  it("garbage instead of a ClientHello after 'S' ends that connection only; the proxy keeps serving", async () => {
    const other = await p.connect('acme.appuser', 'shared_db');
    try {
      const w = await Wire.open(p.port);
      w.socket.write(SSL_REQUEST);
      assert.equal((await w.read(1)).toString(), 'S');
      w.socket.write(Buffer.concat([Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), startup, Buffer.alloc(64, 0xff)]));
      await w.untilClosed();

      // A TLS record header that promises more than ever comes, then the client leaves.
      const w2 = await Wire.open(p.port);
      w2.socket.write(SSL_REQUEST);
      assert.equal((await w2.read(1)).toString(), 'S');
      w2.socket.write(Buffer.from([0x16, 0x03, 0x01, 0x40, 0x00, 0x01]));
      await new Promise((r) => setTimeout(r, 50));
      w2.socket.destroy();

      // A client that leaves right after 'S'.
      const w3 = await Wire.open(p.port);
      w3.socket.write(SSL_REQUEST);
      assert.equal((await w3.read(1)).toString(), 'S');
      w3.socket.end();

      assert.equal((await other.query<{ s: string }>('SELECT current_schema() AS s')).rows[0]!.s, 'acme');
      const fresh = new pg.Client({ ...p.clientConfig('acme.appuser', 'shared_db'), host: 'localhost', ssl: { ca: certs.ca, servername: 'localhost' } });
      await fresh.connect();
      assert.equal((await fresh.query<{ n: number }>('SELECT 1::int AS n')).rows[0]!.n, 1);
      await fresh.end();
    } finally {
      await other.end();
    }
    await eventually(() => p.proxy.ctx.sessions.size === 0, 3000, `the aborted sessions to end (${p.proxy.ctx.sessions.size} left)`);
  });
});

describe('client TLS: a direct TLS ClientHello (no SSLRequest)', () => {
  let p: TestProxy;
  before(async () => {
    certs = await testCerts();
    p = await startProxy({ toml: tlsToml('allow') });
  });
  after(() => p.close());

  it('is refused at once (not left waiting for a 369 MB startup packet) and the proxy keeps serving', async () => {
    const t0 = Date.now();
    await assert.rejects(
      new Promise<void>((resolve, reject) => {
        const t = tlsConnect({ host: '127.0.0.1', port: p.port, ca: certs.ca, servername: 'localhost', ALPNProtocols: ['postgresql'] }, () => {
          t.destroy();
          resolve();
        });
        t.once('error', reject);
        t.once('close', () => reject(new Error('closed before the handshake')));
      }),
    );
    assert.ok(Date.now() - t0 < 2000, `took ${Date.now() - t0} ms`);
    const c = await p.connect('acme.appuser', 'shared_db');
    await c.end();
    await eventually(() => p.proxy.ctx.sessions.size === 0, 2000, 'the sessions to end');
  });
});

describe('client TLS, mode = "disable"', () => {
  let p: TestProxy;
  before(async () => {
    certs = await testCerts();
    p = await startProxy({ toml: tlsToml('disable') });
  });
  after(() => p.close());

  it("SSLRequest is answered 'N'; sslmode=require fails, sslmode=prefer goes on in plaintext", async () => {
    const w = await Wire.open(p.port);
    w.socket.write(SSL_REQUEST);
    assert.equal((await w.read(1)).toString(), 'N');
    w.socket.destroy();
    const req = await runPsql(['-At', '-w', '-c', 'SELECT 1', `host=127.0.0.1 port=${p.port} user=acme.appuser dbname=shared_db sslmode=require`], { PGPASSWORD: 'apppass' });
    assert.notEqual(req.code, 0);
    assert.match(req.stderr, /server does not support SSL/);
    const pref = await runPsql(['-At', '-w', '-c', 'SELECT current_schema()', `host=127.0.0.1 port=${p.port} user=acme.appuser dbname=shared_db sslmode=prefer`], { PGPASSWORD: 'apppass' });
    assert.equal(pref.code, 0, pref.stderr);
    assert.equal(pref.stdout.trim(), 'acme');
  });
});

describe('client TLS: reload serves a renewed certificate', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'helios-tls-'));
  const path = join(tmp, 'tls-reload.toml');
  let proxy: ProxyServer;
  const write = (cert: string, key: string): void =>
    writeConfigFile(path, (t) => `admin_tls = true\n${t}\n[tls]\ncert_file = ${JSON.stringify(cert)}\nkey_file = ${JSON.stringify(key)}\nmode = "allow"\n`);
  before(async () => {
    certs = await testCerts();
    write(certs.certFile, certs.keyFile);
    proxy = await startFromFile(path, { admin: true });
  });
  after(async () => {
    await proxy.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  it('after the file names the second certificate and reload(), new handshakes (wire and HTTPS admin) get it; open TLS sessions go on', async () => {
    const first = fingerprint(certs.certFile);
    const second = fingerprint(certs.cert2File);
    assert.notEqual(first, second);
    assert.equal(await servedCertificate(proxy.port), first);
    assert.equal(await httpsCertificate(proxy.adminPort!), first);
    const open = new pg.Client({ host: 'localhost', port: proxy.port, user: 'acme.appuser', database: 'shared_db', password: 'apppass', ssl: { ca: certs.ca, servername: 'localhost' } });
    await open.connect();
    try {
      write(certs.cert2File, certs.key2File);
      const r = proxy.reload();
      assert.equal(r.ok, true, JSON.stringify(r));
      assert.ok(r.ok && r.restartRequired.length === 0, JSON.stringify(r));
      assert.equal(await servedCertificate(proxy.port), second);
      assert.equal(await httpsCertificate(proxy.adminPort!), second);
      assert.equal((await open.query<{ s: string }>('SELECT current_schema() AS s')).rows[0]!.s, 'acme');
      const psql = await runPsql(['-At', '-w', '-c', 'SELECT 1', `host=localhost port=${proxy.port} user=acme.appuser dbname=shared_db sslmode=verify-full sslrootcert=${certs.caFile}`], { PGPASSWORD: 'apppass' });
      assert.equal(psql.code, 0, psql.stderr);

      // A key that does not match its certificate is refused at reload; the renewed certificate stays.
      write(certs.certFile, certs.key2File);
      const bad = proxy.reload();
      assert.equal(bad.ok, false);
      assert.ok(!bad.ok && bad.problems.some((m) => m.startsWith('tls: cert_file/key_file')), JSON.stringify(bad));
      assert.equal(await servedCertificate(proxy.port), second);
    } finally {
      await open.end();
    }
  });
});

const external = Object.values(networkInterfaces())
  .flat()
  .find((i) => i !== undefined && i.family === 'IPv4' && !i.internal)?.address;

describe('non-loopback clients: cleartext secrets only over TLS', { skip: external === undefined ? 'no non-loopback IPv4 address' : false }, () => {
  const tmp = mkdtempSync(join(tmpdir(), 'helios-tls-remote-'));
  after(() => rmSync(tmp, { recursive: true, force: true }));
  const userlist = join(tmp, 'userlist.txt');
  writeFileSync(userlist, '"appuser" "apppass"\n');
  const SECRET = 'a-test-secret-that-is-long-enough-for-hs256!';
  const tls = { ca: (): Buffer => certs.ca, servername: 'localhost' };
  const start = async (toml: (t: string) => string): Promise<ProxyServer> =>
    ProxyServer.start(loadTestConfig({ toml }), { logger: silentLogger(), listen: { host: external!, port: 0 }, admin: null, gateway: null });
  before(async () => {
    certs = await testCerts();
  });

  it('passthrough (no [auth]): refused in plaintext (28000), served over TLS', async () => {
    const proxy = await start(tlsToml('allow'));
    try {
      const cfg = { host: external!, port: proxy.port, user: 'acme.appuser', database: 'shared_db', password: 'apppass' };
      const f = await loginFails(cfg);
      assert.equal(f.code, '28000');
      assert.match(f.message, /only allowed over TLS or from loopback/);
      const c = new pg.Client({ ...cfg, ssl: { ca: tls.ca(), servername: tls.servername } });
      await c.connect();
      assert.equal((await c.query<{ s: string }>('SELECT current_schema() AS s')).rows[0]!.s, 'acme');
      await c.end();
    } finally {
      await proxy.close();
    }
  });

  it('jwt_claim: a token is refused in plaintext (28000) and accepted over TLS', async () => {
    const proxy = await start((t) =>
      tlsToml('allow')(t.replace(/method\s*=\s*"username_prefix"/, 'method = "jwt_claim"')) +
      `\n[auth]\nauth_file = ${JSON.stringify(userlist)}\n\n[multi_tenancy.identification.jwt]\nsecret = ${JSON.stringify(SECRET)}\nallowed_roles = ["appuser"]\n`,
    );
    try {
      const token = await new SignJWT({ tenant_id: 'acme' }).setProtectedHeader({ alg: 'HS256' }).setExpirationTime('5m').sign(new TextEncoder().encode(SECRET));
      const cfg = { host: external!, port: proxy.port, user: 'appuser', password: token };
      const f = await loginFails(cfg);
      assert.equal(f.code, '28000');
      assert.match(f.message, /token is accepted only over TLS or from loopback/);
      const c = new pg.Client({ ...cfg, ssl: { ca: tls.ca(), servername: tls.servername } });
      await c.connect();
      assert.equal((await c.query<{ s: string }>('SELECT current_schema() AS s')).rows[0]!.s, 'acme');
      await c.end();
    } finally {
      await proxy.close();
    }
  });
});
