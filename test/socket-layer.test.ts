// The relay's socket layer (socket_layer = "native" | "node") under stress: every scenario runs once per
// layer, in transaction pooling (the reference default) and, where noted, session pooling. Slow and stalled
// readers (the proxy's write queue and backpressure), large results and uploads, clients and backends that
// vanish mid-stream, pipelining, fragmented input, cancels, pgbench, connection churn (descriptor leaks),
// TLS clients beside native backends, and the admin API's view of the layer. A few tests drive the io layer
// directly (adoptSocket on a local connection pair, and a child process for a throwing listener).
// The proxies run with guardrails: false: COPY is outside acme's allowed_operations, and pgbench and the
// pipelining tests run far above its qps_limit. Schema isolation still puts acme's tables in schema acme.
// A hand-driven wire client (WireClient) is used where a driver would hide what is tested: it can stop
// reading, reset its socket mid-result, pipeline behind its login, and dribble a message byte by byte.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect as netConnect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import postgres from 'postgres';
import { ScramClientExchange } from '../src/auth/scram.js';
import { ConfigError, parseConfig } from '../src/config/load.js';
import type { Config } from '../src/config/schema.js';
import { adoptSocket, nativeSocketLayer, nativeSocketStats, type ByteStream } from '../src/io/native-socket.js';
import { isExecutable, run, type RunResult } from '../src/localpg/proc.js';
import { cancelRequest, decodeDataRow, decodeErrorFields, passwordMessage, query, saslInitialResponse, sslRequest, startupMessage, TERMINATE } from '../src/protocol/messages.js';
import { testCerts } from './helpers/certs.js';
import { psqlBin, runPsql, testPg } from './helpers/pg.js';
import { direct, eventually, loadTestConfig, REFERENCE_TOML, startProxy, type TestProxy } from './helpers/proxy.js';

const USER = 'acme.appuser';
const DB = 'shared_db';
const PASSWORD = 'apppass';
const LAYERS = ['native', 'node'] as const;
type Layer = (typeof LAYERS)[number];
const T = { timeout: 20_000 };

// ── small helpers ────────────────────────────────────────────────────────────────────

/** `p`, or a rejection after `ms`: a hang must fail the test, not the run. */
async function within<V>(p: Promise<V>, ms: number, what: string): Promise<V> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms (a hang)`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function codeOf(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err) return String((err as { code: unknown }).code);
  return undefined;
}

const md5 = (s: string): string => createHash('md5').update(s).digest('hex');
const sha256 = (b: Buffer | string): string => createHash('sha256').update(b).digest('hex');

// ── a hand-driven wire client ─────────────────────────────────────────────────────────

interface WireMessage {
  type: string;
  /** The whole message, type byte and length included. */
  raw: Buffer;
}

/**
 * A PostgreSQL client on a plain socket that can stop reading (socket.pause()), reset its connection
 * mid-stream, and write arbitrary bytes. Incoming bytes are split into messages as they arrive, joining
 * chunks only once a message is complete (results of tens of MB stay linear).
 */
class WireClient {
  private chunks: Buffer[] = [];
  private have = 0;
  private readonly inbox: WireMessage[] = [];
  private head = 0;
  private wake: (() => void) | null = null;
  closed = false;
  keyData: { pid: number; secret: number } | null = null;

  private constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.have += d.length;
      this.split();
      this.notify();
    });
    socket.on('close', () => {
      this.closed = true;
      this.notify();
    });
    socket.on('error', () => {});
  }

  static connect(port: number): Promise<WireClient> {
    return new Promise((resolve, reject) => {
      const s = netConnect({ host: '127.0.0.1', port, noDelay: true });
      s.once('connect', () => {
        s.off('error', reject);
        resolve(new WireClient(s));
      });
      s.once('error', reject);
    });
  }

  /** Over TLS: SSLRequest, 'S', then the handshake, verifying the test CA's certificate for localhost. */
  static async connectTls(port: number, ca: Buffer): Promise<WireClient> {
    const plain = await new Promise<Socket>((resolve, reject) => {
      const s = netConnect({ host: '127.0.0.1', port, noDelay: true });
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
    plain.write(sslRequest());
    const answer = await new Promise<Buffer>((resolve) => plain.once('data', resolve));
    assert.equal(answer.toString('latin1'), 'S');
    const secure = await new Promise<TLSSocket>((resolve, reject) => {
      const t = tlsConnect({ socket: plain, ca, servername: 'localhost' }, () => resolve(t));
      t.once('error', reject);
    });
    return new WireClient(secure);
  }

  static async login(port: number): Promise<WireClient> {
    const w = await WireClient.connect(port);
    await w.login();
    return w;
  }

  private notify(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  /** Makes the first chunk at least `n` bytes long (have >= n). */
  private front(n: number): Buffer {
    let first = this.chunks[0]!;
    if (first.length >= n) return first;
    let k = 0;
    let got = 0;
    while (got < n) got += this.chunks[k++]!.length;
    first = Buffer.concat(this.chunks.slice(0, k), got);
    this.chunks.splice(0, k, first);
    return first;
  }

  private split(): void {
    while (this.have >= 5) {
      const len = this.front(5).readInt32BE(1) + 1;
      if (this.have < len) return;
      const buf = this.front(len);
      this.inbox.push({ type: String.fromCharCode(buf[0]!), raw: buf.subarray(0, len) });
      this.have -= len;
      if (buf.length === len) this.chunks.shift();
      else this.chunks[0] = buf.subarray(len);
    }
  }

  write(data: Buffer): void {
    this.socket.write(data);
  }

  /** The next message; fails after `ms` or when the connection closed with nothing left to read. */
  async next(ms = 5000): Promise<WireMessage> {
    const until = Date.now() + ms;
    for (;;) {
      if (this.head < this.inbox.length) {
        const m = this.inbox[this.head++]!;
        if (this.head === this.inbox.length) {
          this.inbox.length = 0;
          this.head = 0;
        }
        return m;
      }
      if (this.closed) throw new Error('connection closed');
      const left = until - Date.now();
      if (left <= 0) throw new Error(`no message within ${ms} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  /** Reads up to and including ReadyForQuery, handing every message to `each` (or collecting them). */
  async untilReady(ms = 10_000, each?: (m: WireMessage) => void): Promise<WireMessage[]> {
    const until = Date.now() + ms;
    const out: WireMessage[] = [];
    for (;;) {
      const m = await this.next(Math.max(1, until - Date.now()));
      if (each) each(m);
      else out.push(m);
      if (m.type === 'Z') return out;
    }
  }

  async simple(sql: string, ms = 10_000): Promise<WireMessage[]> {
    this.write(query(sql));
    return this.untilReady(ms);
  }

  /**
   * Logs in. `pipelined` goes out right behind the last authentication message, before the proxy
   * answered it: in the same write ("same write") or in a second write of the same tick ("next write").
   */
  async login(user = USER, database = DB, password = PASSWORD, pipelined?: { bytes: Buffer; how: 'same write' | 'next write' }): Promise<void> {
    const last = (msg: Buffer): void => {
      if (pipelined === undefined) this.write(msg);
      else if (pipelined.how === 'same write') this.write(Buffer.concat([msg, pipelined.bytes]));
      else {
        this.write(msg);
        this.write(pipelined.bytes);
      }
    };
    this.write(startupMessage({ user, database }));
    let scram: ScramClientExchange | null = null;
    for (;;) {
      const m = await this.next(10_000);
      const body = m.raw.subarray(5);
      if (m.type === 'R') {
        const code = body.readInt32BE(0);
        if (code === 3) last(passwordMessage(password));
        else if (code === 5) last(passwordMessage('md5' + md5(md5(password + user.split('.').pop()!) + body.subarray(4, 8).toString('latin1'))));
        else if (code === 10) {
          scram = new ScramClientExchange({ password });
          this.write(saslInitialResponse('SCRAM-SHA-256', scram.clientFirst()));
        } else if (code === 11 && scram !== null) last(passwordMessage(await scram.clientFinal(Buffer.from(body.subarray(4)))));
        else if (code === 12 && scram !== null) assert.ok(scram.verifyServerFinal(body.subarray(4)), 'server SCRAM signature');
        else assert.equal(code, 0, `authentication request ${code}`);
      } else if (m.type === 'K') this.keyData = { pid: body.readInt32BE(0), secret: body.readInt32BE(4) };
      else if (m.type === 'E') throw new Error(`login failed: ${errorFields(m).get('M')}`);
      else if (m.type === 'Z') return;
    }
  }

  /** Sends Terminate and waits for the close (a polite end). */
  async end(): Promise<void> {
    if (this.closed) return;
    this.write(TERMINATE);
    this.socket.end();
    await within(
      new Promise<void>((r) => (this.closed ? r() : this.socket.once('close', () => r()))),
      3000,
      'the proxy closing after Terminate',
    ).catch(() => this.socket.destroy());
  }
}

function errorFields(m: WireMessage): Map<string, string> {
  return decodeErrorFields(m.raw, 0, m.raw.length);
}
const rowOf = (m: WireMessage): (string | null)[] => decodeDataRow(m.raw, 0, m.raw.length);

/**
 * Reads the rest of a result whose first column numbers its rows 1, 2, … (failing on a row out of order)
 * until ReadyForQuery or the connection's end: how many rows came, the ErrorResponses, and why reading
 * stopped when the connection ended.
 */
async function readNumberedRows(w: WireClient, waitMs: number): Promise<{ rows: number; errors: WireMessage[]; closed: string | null }> {
  let rows = 0;
  const errors: WireMessage[] = [];
  for (;;) {
    let m: WireMessage;
    try {
      m = await w.next(waitMs);
    } catch (err) {
      return { rows, errors, closed: `closed (${(err as Error).message})` };
    }
    if (m.type === 'D') {
      const n = Number(rowOf(m)[0]);
      if (n !== rows + 1) assert.fail(`row ${rows + 1} expected, got ${n}`);
      rows++;
    } else if (m.type === 'E') errors.push(m);
    else if (m.type === 'Z') return { rows, errors, closed: null };
  }
}

// ── admin and backend views ───────────────────────────────────────────────────────────

interface GlobalMetrics {
  clients: number;
  socket_layer: { mode: string; native_sockets: number };
  backends: { active: number; idle: number; connecting: number; waiting: number };
}

async function adminGet<V>(p: TestProxy, path: string): Promise<V> {
  const res = await fetch(`http://127.0.0.1:${p.adminPort}${path}`, { headers: { accept: 'application/json' } });
  assert.equal(res.status, 200, `GET ${path}`);
  return (await res.json()) as V;
}
const metricsOf = (p: TestProxy): Promise<GlobalMetrics> => adminGet<GlobalMetrics>(p, '/metrics');
async function acmeClients(p: TestProxy): Promise<number> {
  const t = await adminGet<{ live?: { clients: number } }>(p, '/tenants/acme');
  assert.ok(t.live, 'GET /tenants/acme has live counts');
  return t.live.clients;
}
async function prometheusNativeSockets(p: TestProxy): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${p.adminPort}/metrics/prometheus`)).text();
  const m = /^heliosproxy_native_sockets (\d+)$/m.exec(text);
  assert.ok(m, `heliosproxy_native_sockets in the exposition:\n${text.slice(0, 2000)}`);
  return Number(m[1]);
}

/** Superuser connection for watching (and killing) backends. */
let monitor: pg.Client;

/** appuser backends in shared_db doing something (a query, or an open transaction). */
async function busyBackends(): Promise<{ pid: number; state: string; query: string }[]> {
  return (
    await monitor.query<{ pid: number; state: string; query: string }>(
      "SELECT pid, state, query FROM pg_stat_activity WHERE usename = 'appuser' AND datname = $1 AND backend_type = 'client backend' AND state <> 'idle'",
      [DB],
    )
  ).rows;
}

async function pidRunning(marker: string): Promise<number | null> {
  const r = await monitor.query<{ pid: number }>(
    "SELECT pid FROM pg_stat_activity WHERE usename = 'appuser' AND state = 'active' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
    [marker],
  );
  return r.rows[0]?.pid ?? null;
}

/**
 * Nothing left behind: the tenant's client count is back to `clients`, no backend is checked out of the
 * proxy's pools, and no appuser backend is still running a statement or holding a transaction.
 */
async function noLeaks(p: TestProxy, clients: number, what: string): Promise<void> {
  await eventually(async () => (await acmeClients(p)) === clients, 5000, `${what}: acme's client count back to ${clients} (is ${await acmeClients(p)})`);
  await eventually(async () => (await metricsOf(p)).backends.active === 0, 5000, `${what}: no backend checked out (${JSON.stringify((await metricsOf(p)).backends)})`);
  await eventually(async () => (await busyBackends()).length === 0, 5000, `${what}: no appuser backend busy (${JSON.stringify(await busyBackends())})`);
}

/** Open native sockets the proxies of a describe account for: logged-in clients and pooled backends. */
/**
 * Two TCP connections through a local server, for the io-layer tests: `peers` are the dialing ends, `sockets`
 * the accepted ends, moved onto the native layer when `native` (each stands for a socket of the proxy).
 */
async function acceptedPair(native: boolean): Promise<{ peers: [Socket, Socket]; sockets: [ByteStream, ByteStream]; close(): void }> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  const accepted: Socket[] = [];
  server.on('connection', (s) => accepted.push(s));
  const dial = (): Promise<Socket> =>
    new Promise((resolve, reject) => {
      const c = netConnect({ host: '127.0.0.1', port, noDelay: true }, () => resolve(c));
      c.once('error', reject);
    });
  const peers: [Socket, Socket] = [await dial(), await dial()];
  await eventually(() => accepted.length === 2, 2000, 'both accepted');
  const wrap = (s: Socket): ByteStream => {
    s.on('error', () => {});
    if (!native) return s;
    const n = adoptSocket(s);
    assert.ok(n !== null, 'adopted');
    return n;
  };
  const sockets: [ByteStream, ByteStream] = [wrap(accepted[0]!), wrap(accepted[1]!)];
  // Let the event loop register both sockets with the poller first: readiness order then decides.
  await sleep(20);
  return {
    peers,
    sockets,
    close: () => {
      for (const x of sockets) x.destroy();
      for (const x of peers) x.destroy();
      server.close();
    },
  };
}

function accountedNative(proxies: TestProxy[]): number {
  let n = 0;
  for (const p of proxies) {
    n += p.proxy.ctx.sessions.size;
    for (const pool of p.proxy.ctx.pools.all()) {
      const s = pool.stats();
      n += s.idle + s.active;
    }
  }
  return n;
}

// ── a listener that throws, in a child process (an uncaught exception must not hit the test runner) ──

/**
 * The child: two accepted connections on the layer under test; the first 'data' listener call throws. It
 * reports what surfaced as an uncaught exception, what each socket received, and whether a later, unrelated
 * call on the other socket went through.
 */
const THROWING_LISTENER_CHILD = `
import { createServer, connect } from 'node:net';
import { adoptSocket } from ${JSON.stringify(fileURLToPath(new URL('../src/io/native-socket.ts', import.meta.url)))};
const layer = process.argv[2];
const out = { uncaught: [], received: [], laterCall: '' };
process.on('uncaughtException', (e) => out.uncaught.push(e.message));
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
const server = createServer();
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const accepted = [];
server.on('connection', (s) => accepted.push(s));
const dial = () => new Promise((res) => { const c = connect({ host: '127.0.0.1', port: server.address().port }, () => res(c)); });
const p1 = await dial();
const p2 = await dial();
while (accepted.length < 2) await pause(5);
const wrap = (s) => (layer === 'native' ? adoptSocket(s) : s);
const a = wrap(accepted[0]);
const b = wrap(accepted[1]);
let first = true;
a.on('data', (d) => { out.received.push('a:' + d); if (first) { first = false; throw new Error('listener bug'); } });
b.on('data', (d) => out.received.push('b:' + d));
p1.write('one');
await pause(100);
p1.write('two');
p2.write('three');
await pause(100);
try { b.write('ping'); out.laterCall = 'ok'; } catch (e) { out.laterCall = 'threw: ' + e.message; }
await pause(100);
console.log(JSON.stringify(out));
process.exit(0);
`;

// ── pgbench ───────────────────────────────────────────────────────────────────────────

const PGBENCH_TABLES = ['pgbench_accounts', 'pgbench_branches', 'pgbench_history', 'pgbench_tellers'];

function pgbench(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  const dir = testPg().binDir;
  const bin = isExecutable(join(dir, 'pgbench')) ? join(dir, 'pgbench') : 'pgbench';
  return run(bin, args, { env: { ...process.env, PGPASSWORD: PASSWORD, PGCONNECT_TIMEOUT: '10', ...env } });
}

// ── the suite ─────────────────────────────────────────────────────────────────────────

const tmp = mkdtempSync(join(tmpdir(), 'helios-socket-layer-'));

before(async () => {
  const db = testPg();
  monitor = new pg.Client({ host: db.host, port: db.port, user: db.superuser, password: db.password, database: 'postgres' });
  await monitor.connect();
  // pgbench's tables, created directly as appuser in schema acme (test files run one at a time: see
  // test/run.ts --test-concurrency=1, so pgbench.test.ts's own copy of them is never there at once).
  const init = await pgbench(['-i', '-s', '1', '-q', '-h', db.host, '-p', String(db.port), '-U', 'appuser', DB], { PGOPTIONS: '-c search_path=acme' });
  assert.equal(init.code, 0, `pgbench -i failed:\n${init.stderr}`);
});

after(async () => {
  const db = testPg();
  const drop = new pg.Client({ host: db.host, port: db.port, user: db.superuser, password: db.password, database: DB });
  await drop.connect();
  await drop.query(`DROP TABLE IF EXISTS ${PGBENCH_TABLES.map((t) => `acme.${t}`).join(', ')}, acme.socket_layer_copy_native, acme.socket_layer_copy_node`);
  await drop.end();
  await monitor?.end();
  rmSync(tmp, { recursive: true, force: true });
});

describe('socket_layer in the config', () => {
  test('socket_layer = "bogus" is a load error naming socket_layer; "native", "node" and "auto" load', () => {
    let problems: string[] = [];
    try {
      parseConfig(`socket_layer = "bogus"\n${REFERENCE_TOML}`, 'bogus.toml');
      assert.fail('socket_layer = "bogus" loaded');
    } catch (err) {
      assert.ok(err instanceof ConfigError, `a ConfigError, got ${String(err)}`);
      problems = err.problems;
    }
    assert.ok(problems.some((p) => p.includes('socket_layer')), `a problem names socket_layer: ${problems.join(' | ')}`);
    assert.ok(nativeSocketLayer.available, `the addon is built in this repo: ${nativeSocketLayer.reason}`);
    for (const v of ['native', 'node', 'auto']) assert.equal(parseConfig(`socket_layer = "${v}"\n${REFERENCE_TOML}`).config.socket_layer, v);
    assert.equal(parseConfig(REFERENCE_TOML).config.socket_layer, 'auto', 'default');
  });
});

for (const layer of LAYERS) {
  describe(`socket_layer = "${layer}"`, () => {
    const native = layer === 'native';
    let tx: TestProxy;
    let ses: TestProxy;
    let closed = false;
    const patch = (c: Config): void => {
      c.socket_layer = layer;
    };

    before(async () => {
      // The other layer's describe closed its proxies: none of its native sockets may still be open.
      await eventually(() => nativeSocketStats.open === 0, 5000, `native sockets of earlier proxies to close (${nativeSocketStats.open} open)`);
      tx = await startProxy({ admin: true, guardrails: false, patch });
      ses = await startProxy({ admin: true, guardrails: false, mode: 'session', patch });
    });

    after(async () => {
      if (!closed) await Promise.all([tx?.close(), ses?.close()]);
    });

    // Connections a test opened: a failed test must not leave one behind for the next test's counts.
    const opened: Socket[] = [];
    afterEach(() => {
      for (const s of opened.splice(0)) s.destroy();
    });
    const pgClient = async (p: TestProxy = tx): Promise<pg.Client> => {
      const c = new pg.Client(p.clientConfig(USER, DB));
      c.on('error', () => {});
      await c.connect();
      opened.push(c.connection.stream as Socket);
      return c;
    };
    const wire = async (p: TestProxy = tx): Promise<WireClient> => {
      const w = await WireClient.login(p.port);
      opened.push(w.socket);
      return w;
    };

    // ── 1 ──
    test('admin JSON and Prometheus show the layer; native_sockets counts connected clients and drops back when they leave', T, async () => {
      const m0 = await metricsOf(tx);
      assert.equal(m0.socket_layer.mode, layer);
      const clients = await Promise.all(Array.from({ length: 5 }, () => pgClient()));
      const wires = await Promise.all(Array.from({ length: 3 }, () => wire()));
      for (const c of clients) await c.query('SELECT 1');
      const m1 = await metricsOf(tx);
      assert.equal(m1.clients, 8);
      if (native) {
        assert.ok(m1.socket_layer.native_sockets >= 8, `8 clients connected, native_sockets = ${m1.socket_layer.native_sockets}`);
        // Every logged-in client and every pooled backend is on the native layer, nothing else is.
        await eventually(() => nativeSocketStats.open === accountedNative([tx, ses]), 3000, `native sockets (${nativeSocketStats.open}) = clients + pooled backends (${accountedNative([tx, ses])})`);
      } else assert.equal(m1.socket_layer.native_sockets, 0);
      assert.equal(await prometheusNativeSockets(tx), (await metricsOf(tx)).socket_layer.native_sockets);
      await Promise.all([...clients.map((c) => c.end()), ...wires.map((w) => w.end())]);
      await eventually(async () => (await metricsOf(tx)).clients === 0, 3000, 'clients to leave');
      const m2 = await metricsOf(tx);
      if (native) {
        await eventually(() => nativeSocketStats.open === accountedNative([tx, ses]), 3000, `native sockets (${nativeSocketStats.open}) back to the pooled backends (${accountedNative([tx, ses])})`);
        assert.ok(m2.socket_layer.native_sockets <= m1.socket_layer.native_sockets - 8, `dropped by the 8 clients: ${m1.socket_layer.native_sockets} -> ${m2.socket_layer.native_sockets}`);
      } else assert.equal(m2.socket_layer.native_sockets, 0);
      assert.equal(await prometheusNativeSockets(tx), (await metricsOf(tx)).socket_layer.native_sockets);
    });

    // ── 2 ──
    test('20 000 rows of 1 kB to a client that stops reading for 1 s: backpressure reaches PostgreSQL; complete, in order; other clients are served meanwhile', T, async () => {
      const N = 20_000;
      const w = await wire();
      const other = await pgClient();
      w.socket.pause();
      w.write(query(`SELECT i, repeat(chr(65 + i % 26), 1000) AS pad, 'slowreader' AS marker FROM generate_series(1, ${N}) i`));
      const stallEnds = Date.now() + 1000;
      let served = 0;
      let clientWrite = false;
      while (Date.now() < stallEnds) {
        const r = await within(other.query<{ n: number }>('SELECT count(*)::int AS n FROM generate_series(1, 1000)'), 2000, 'another client during the stall');
        assert.equal(r.rows[0]!.n, 1000);
        served++;
        const waits = await monitor.query<{ wait_event: string | null }>("SELECT wait_event FROM pg_stat_activity WHERE query LIKE '%''slowreader''%' AND pid <> pg_backend_pid()");
        if (waits.rows.some((x) => x.wait_event === 'ClientWrite')) clientWrite = true;
        await sleep(50);
      }
      assert.ok(served >= 2, `other client served ${served} times during the stall`);
      // Backpressure reached PostgreSQL: the proxy stopped reading the backend instead of buffering the result.
      assert.ok(clientWrite, 'the backend was blocked on ClientWrite during the stall');
      w.socket.resume();
      let expect = 1;
      let rowDesc = 0;
      let complete = '';
      await w.untilReady(10_000, (m) => {
        if (m.type === 'D') {
          const [i, pad] = rowOf(m);
          const n = Number(i);
          if (n !== expect) assert.fail(`row ${expect} expected, got ${i}`);
          if (pad !== String.fromCharCode(65 + (n % 26)).repeat(1000)) assert.fail(`row ${n}: wrong pad`);
          expect++;
        } else if (m.type === 'T') rowDesc++;
        else if (m.type === 'C') complete = m.raw.toString('utf8', 5, m.raw.length - 1);
        else if (m.type === 'E') assert.fail(`error: ${errorFields(m).get('M')}`);
      });
      assert.equal(rowDesc, 1);
      assert.equal(expect - 1, N);
      assert.equal(complete, `SELECT ${N}`);
      // The connection is still in step.
      assert.deepEqual(rowOf((await w.simple('SELECT 42')).find((m) => m.type === 'D')!), ['42']);
      await w.end();
      await other.end();
      await noLeaks(tx, 0, 'after the slow reader');
    });

    test('a TLS client stays on Node sockets while its backend is native: a 20 000-row result to it, stalled for 1 s, arrives whole and in order', T, async () => {
      const certs = await testCerts();
      const tls = await startProxy({
        admin: true,
        guardrails: false,
        patch,
        toml: (text) => `${text}\n[tls]\ncert_file = ${JSON.stringify(certs.certFile)}\nkey_file = ${JSON.stringify(certs.keyFile)}\nmode = "allow"\n`,
      });
      try {
        const N = 20_000;
        const w = await WireClient.connectTls(tls.port, certs.ca);
        opened.push(w.socket);
        await w.login();
        const plain = await wire(tls);
        assert.deepEqual(rowOf((await plain.simple('SELECT 1')).find((m) => m.type === 'D')!), ['1']);
        if (native) {
          // Everything but the TLS client: the plain client and every pooled backend.
          await eventually(() => nativeSocketStats.open === accountedNative([tx, ses, tls]) - 1, 3000, `native sockets (${nativeSocketStats.open}) = everything but the TLS client (${accountedNative([tx, ses, tls]) - 1})`);
        } else assert.equal(nativeSocketStats.open, 0);
        w.socket.pause();
        w.write(query(`SELECT i, repeat(chr(65 + i % 26), 1000) AS pad FROM generate_series(1, ${N}) i`));
        await sleep(1000);
        assert.deepEqual(rowOf((await within(plain.simple('SELECT 2'), 2000, 'the plain client during the stall')).find((m) => m.type === 'D')!), ['2']);
        w.socket.resume();
        let expect = 1;
        await w.untilReady(10_000, (m) => {
          if (m.type === 'D') {
            const [i, pad] = rowOf(m);
            if (Number(i) !== expect || pad !== String.fromCharCode(65 + (expect % 26)).repeat(1000)) assert.fail(`row ${expect} expected, got ${i}`);
            expect++;
          } else if (m.type === 'E') assert.fail(`error: ${errorFields(m).get('M')}`);
        });
        assert.equal(expect - 1, N);
        await w.end();
        await plain.end();
        await noLeaks(tls, 0, 'after the TLS client');
      } finally {
        await within(tls.close(), 5000, 'closing the TLS proxy').catch(() => undefined);
      }
    });

    test('an 8 MB value to a client that stops reading for 1 s arrives byte-exact', T, async () => {
      const K = 262_144; // 32 hex digits each: 8 MiB
      let expected = '';
      for (let i = 1; i <= K; i++) expected += md5(String(i));
      const w = await wire();
      w.socket.pause();
      w.write(query(`SELECT string_agg(md5(i::text), '' ORDER BY i) AS v FROM generate_series(1, ${K}) i`));
      await sleep(1000);
      const other = await pgClient();
      assert.equal((await within(other.query<{ v: number }>('SELECT 7 AS v'), 2000, 'another client during the stall')).rows[0]!.v, 7);
      await other.end();
      w.socket.resume();
      const msgs = await w.untilReady(10_000);
      const rows = msgs.filter((m) => m.type === 'D');
      assert.equal(rows.length, 1, `types: ${msgs.map((m) => m.type).join('')}`);
      const v = rowOf(rows[0]!)[0]!;
      assert.equal(v.length, 32 * K);
      assert.equal(sha256(v), sha256(expected));
      await w.end();
    });

    test('a client pipelines 12 MB of queries without reading the answers, then reads: every answer, in order (both directions under backpressure)', T, async () => {
      const N = 3000;
      const pad = 'q'.repeat(4000);
      const w = await wire();
      const other = await pgClient();
      w.socket.pause();
      w.write(Buffer.concat(Array.from({ length: N }, (_, i) => query(`SELECT ${i} AS i, repeat('z', ${1000 + (i % 3000)}) AS z /* ${pad} */`))));
      await sleep(1000);
      assert.equal((await within(other.query<{ v: number }>('SELECT 9 AS v'), 2000, 'another client while both directions are stuck')).rows[0]!.v, 9);
      w.socket.resume();
      for (let i = 0; i < N; i++) {
        const msgs = await w.untilReady(10_000);
        const d = msgs.find((m) => m.type === 'D');
        if (d === undefined) assert.fail(`answer ${i}: ${msgs.map((m) => (m.type === 'E' ? errorFields(m).get('M') : m.type)).join(' ')}`);
        const [gi, z] = rowOf(d);
        if (gi !== String(i) || z!.length !== 1000 + (i % 3000)) assert.fail(`answer ${i}: got row ${gi} with ${z!.length} bytes`);
      }
      await w.end();
      await other.end();
      await noLeaks(tx, 0, 'after the pipelined upload');
    });

    for (const how of ['same write', 'next write'] as const) {
      test(`queries pipelined behind the last login message (${how}) are answered, in order, across the hand-over to the relay`, T, async () => {
        for (let round = 0; round < 10; round++) {
          const w = await WireClient.connect(tx.port);
          opened.push(w.socket);
          const batch = Buffer.concat([query(`SELECT ${round} AS r, 'early' AS e`), query(`SELECT ${round} + 1000 AS r`)]);
          await w.login(USER, DB, PASSWORD, { bytes: batch, how });
          const first = await w.untilReady();
          assert.deepEqual(rowOf(first.find((m) => m.type === 'D')!), [String(round), 'early'], first.map((m) => m.type).join(''));
          const second = await w.untilReady();
          assert.deepEqual(rowOf(second.find((m) => m.type === 'D')!), [String(round + 1000)]);
          assert.deepEqual(rowOf((await w.simple('SELECT 1')).find((m) => m.type === 'D')!), ['1']);
          await w.end();
        }
      });
    }

    // ── 3 ──
    test('COPY FROM STDIN of ~20 MB through psql (\\copy) loads every row intact', T, async () => {
      const table = `socket_layer_copy_${layer}`;
      const ROWS = 200_000;
      const payloads: string[] = [];
      const lines: string[] = [];
      for (let i = 1; i <= ROWS; i++) {
        const p = md5(String(i)).repeat(3);
        payloads.push(p);
        lines.push(`${i}\t${p}`);
      }
      const file = join(tmp, `${table}.tsv`);
      writeFileSync(file, lines.join('\n') + '\n');
      const args = ['-h', '127.0.0.1', '-p', String(tx.port), '-U', USER, '-d', DB, '-q', '-At', '-v', 'ON_ERROR_STOP=1', '-f', '-'];
      const env = { PGPASSWORD: PASSWORD, PGCONNECT_TIMEOUT: '10' };
      const c = await pgClient();
      await c.query(`DROP TABLE IF EXISTS ${table}; CREATE TABLE ${table} (id int, payload text)`);
      const r = await within(runPsql(args, env, `\\copy ${table} (id, payload) FROM '${file}'\n`), 15_000, 'psql \\copy');
      assert.equal(r.code, 0, r.stderr);
      const got = await c.query<{ n: number; s: string; h: string }>(`SELECT count(*)::int AS n, sum(id)::text AS s, md5(string_agg(payload, '' ORDER BY id)) AS h FROM ${table}`);
      assert.deepEqual(got.rows[0], { n: ROWS, s: String((ROWS * (ROWS + 1)) / 2), h: md5(payloads.join('')) });
      assert.deepEqual(await direct('SELECT schemaname FROM pg_tables WHERE tablename = $1', DB, [table]), [{ schemaname: 'acme' }]);
      await c.query(`DROP TABLE ${table}`);
      await c.end();
      await noLeaks(tx, 0, 'after COPY');
    });

    test('an 8 MB bind parameter travels client → backend intact (node-postgres, extended protocol)', T, async () => {
      const big = randomBytes(4 * 1024 * 1024).toString('hex');
      const c = await pgClient();
      const r = await c.query<{ n: number; h: string }>('SELECT length($1::text) AS n, md5($1::text) AS h', [big]);
      assert.deepEqual(r.rows[0], { n: big.length, h: md5(big) });
      await c.end();
    });

    // ── 4 ──
    const pooling = [
      ['transaction', (): TestProxy => tx],
      ['session', (): TestProxy => ses],
    ] as const;

    for (const [poolMode, proxyOf] of pooling) {
      test(`${poolMode} pooling: a client reset (RST) mid-result while it was not reading: nothing leaks, the proxy keeps serving`, T, async () => {
        const p = proxyOf();
        const before = await acmeClients(p);
        const w = await wire(p);
        w.socket.pause();
        w.write(query("SELECT i, repeat('r', 1000) AS pad, 'rstmidresult' AS m FROM generate_series(1, 50000) i"));
        await sleep(400);
        w.socket.resetAndDestroy();
        await noLeaks(p, before, 'after RST mid-result');
        const c = await pgClient(p);
        assert.equal((await c.query<{ v: number }>('SELECT 1 AS v')).rows[0]!.v, 1);
        await c.end();
      });
    }

    test('a client that reads a little of a large result and then closes (FIN, unread bytes → RST): nothing leaks', T, async () => {
      const before = await acmeClients(tx);
      const w = await wire();
      w.write(query("SELECT i, repeat('f', 1000) AS pad FROM generate_series(1, 50000) i"));
      const first = await w.next();
      assert.equal(first.type, 'T');
      assert.equal((await w.next()).type, 'D');
      w.socket.destroy();
      await noLeaks(tx, before, 'after close mid-result');
    });

    test('a client that half-closes (end(), no Terminate) mid-result: the proxy closes and nothing leaks', T, async () => {
      const before = await acmeClients(tx);
      const w = await wire();
      w.write(query("SELECT i, repeat('h', 1000) AS pad FROM generate_series(1, 20000) i"));
      await w.next();
      w.socket.end();
      // It keeps reading: whatever the proxy still sends, then the close.
      await within(new Promise<void>((r) => (w.closed ? r() : w.socket.once('close', () => r()))), 5000, 'the proxy to close a half-closed client');
      await noLeaks(tx, before, 'after half-close');
    });

    for (const [poolMode, proxyOf] of pooling) {
      test(`${poolMode} pooling: a client reset mid-transaction: the transaction is rolled back, the backend is not leaked`, T, async () => {
        const p = proxyOf();
        const before = await acmeClients(p);
        const w = await wire(p);
        const msgs = await w.simple('BEGIN; SELECT pg_backend_pid() AS pid');
        const pid = Number(rowOf(msgs.find((m) => m.type === 'D')!)[0]);
        assert.equal(msgs.at(-1)!.raw[5], 'T'.charCodeAt(0), 'in a transaction');
        const state = await monitor.query<{ state: string }>('SELECT state FROM pg_stat_activity WHERE pid = $1', [pid]);
        assert.equal(state.rows[0]?.state, 'idle in transaction');
        w.socket.resetAndDestroy();
        await noLeaks(p, before, 'after RST mid-transaction');
        const after = await monitor.query<{ state: string }>('SELECT state FROM pg_stat_activity WHERE pid = $1', [pid]);
        assert.ok(after.rows.length === 0 || after.rows[0]!.state === 'idle', `backend ${pid}: ${JSON.stringify(after.rows)}`);
      });
    }

    test('a client reset mid-COPY FROM STDIN: the backend is closed or cleaned, nothing leaks', T, async () => {
      const before = await acmeClients(tx);
      const w = await wire();
      w.write(query('BEGIN; CREATE TEMP TABLE socket_layer_copy_rst (x text) ON COMMIT DROP; COPY socket_layer_copy_rst FROM STDIN'));
      for (;;) {
        const m = await w.next();
        if (m.type === 'E') assert.fail(`error: ${errorFields(m).get('M')}`);
        if (m.type === 'G') break;
      }
      const row = Buffer.from('some row of text that is not too short\n');
      const copyData = Buffer.alloc(5 + row.length);
      copyData[0] = 'd'.charCodeAt(0);
      copyData.writeInt32BE(4 + row.length, 1);
      row.copy(copyData, 5);
      for (let i = 0; i < 2000; i++) w.write(copyData);
      await sleep(100);
      w.socket.resetAndDestroy();
      await noLeaks(tx, before, 'after RST mid-COPY');
    });

    // ── 5 ──
    test('pg_terminate_backend under a session-mode client, idle and mid-query: an error or a close, never a hang', T, async (t) => {
      // Idle: the next statement settles (fails, or runs on a new backend).
      const a = await pgClient(ses);
      const pidA = (await a.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
      assert.equal((await a.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid, pidA, 'session mode keeps the backend');
      await monitor.query('SELECT pg_terminate_backend($1)', [pidA]);
      await sleep(200);
      const idleOutcome = await within(
        a.query<{ pid: number }>('SELECT pg_backend_pid() AS pid').then(
          (r) => `ran on backend ${r.rows[0]!.pid}`,
          (e: unknown) => `failed: ${codeOf(e) ?? ''} ${e instanceof Error ? e.message : String(e)}`,
        ),
        5000,
        'the statement after the backend was terminated',
      );
      t.diagnostic(`idle kill: ${idleOutcome}`);
      assert.ok(!idleOutcome.startsWith(`ran on backend ${pidA}`), 'not on the dead backend');

      // Mid-query: the statement fails promptly.
      const b = await pgClient(ses);
      const pidB = (await b.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
      const running = b.query('SELECT pg_sleep(8) AS sessionkill');
      const failed = running.then(
        () => null,
        (e: unknown) => e,
      );
      await eventually(async () => (await pidRunning('sessionkill')) === pidB, 3000, 'the sleep to start');
      const started = Date.now();
      await monitor.query('SELECT pg_terminate_backend($1)', [pidB]);
      const err = await within(failed, 4000, 'the statement whose backend was terminated');
      t.diagnostic(`mid-query kill: ${codeOf(err) ?? ''} ${err instanceof Error ? err.message : String(err)} after ${Date.now() - started} ms`);
      assert.ok(err !== null, 'the terminated statement must not succeed');
      // The proxy serves new clients.
      const c = await pgClient(ses);
      assert.equal((await c.query<{ v: number }>('SELECT 5 AS v')).rows[0]!.v, 5);
      await Promise.all([a, b, c].map((x) => within(x.end(), 3000, 'end').catch(() => x.connection.stream.destroy())));
      await eventually(async () => (await acmeClients(ses)) === 0, 5000, 'session clients to leave');
      await eventually(async () => (await metricsOf(ses)).backends.active === 0, 5000, 'session backends back');
    });

    test('pg_terminate_backend under a transaction-mode client mid-query: an error promptly; the client and proxy go on', T, async (t) => {
      const c = await pgClient();
      const failed = c.query('SELECT pg_sleep(8) AS txkill').then(
        () => null,
        (e: unknown) => e,
      );
      let pid: number | null = null;
      await eventually(async () => (pid = await pidRunning('txkill')) !== null, 3000, 'the sleep to start');
      await monitor.query('SELECT pg_terminate_backend($1)', [pid]);
      const err = await within(failed, 4000, 'the statement whose backend was terminated');
      t.diagnostic(`${codeOf(err) ?? ''} ${err instanceof Error ? err.message : String(err)}`);
      assert.ok(err !== null, 'the terminated statement must not succeed');
      const next = await within(
        c.query<{ v: number }>('SELECT 6 AS v').then(
          (r) => `ok ${r.rows[0]!.v}`,
          (e: unknown) => `failed: ${codeOf(e) ?? ''}`,
        ),
        5000,
        'the next statement of that client',
      );
      t.diagnostic(`next statement: ${next}`);
      const d = await pgClient();
      assert.equal((await d.query<{ v: number }>('SELECT 8 AS v')).rows[0]!.v, 8);
      await Promise.all([c, d].map((x) => within(x.end(), 3000, 'end').catch(() => x.connection.stream.destroy())));
      await noLeaks(tx, 0, 'after the backend kill');
    });

    test('a backend terminated while its client is stalled mid-result: once the client reads, rows in order, a FATAL and the close, never a hang', T, async (t) => {
      const w = await wire();
      w.socket.pause();
      w.write(query("SELECT i, repeat('k', 1000) AS pad, 'stallkill' AS m FROM generate_series(1, 50000) i"));
      let pid: number | null = null;
      await eventually(
        async () => {
          const r = await monitor.query<{ pid: number }>("SELECT pid FROM pg_stat_activity WHERE wait_event = 'ClientWrite' AND query LIKE '%''stallkill''%' AND pid <> pg_backend_pid()");
          pid = r.rows[0]?.pid ?? null;
          return pid !== null;
        },
        3000,
        'the backend to block on ClientWrite',
      );
      await monitor.query('SELECT pg_terminate_backend($1)', [pid]);
      await sleep(300);
      w.socket.resume();
      const read = await within(readNumberedRows(w, 8000), 10_000, 'reading after the backend was terminated');
      const last = read.errors.at(-1);
      const ending = last !== undefined ? `error ${errorFields(last).get('C')} ${errorFields(last).get('M')}` : (read.closed ?? '');
      const errors = read.errors.length;
      t.diagnostic(`${read.rows} rows, then ${ending}`);
      assert.ok(read.rows < 50_000, 'the result was cut short');
      // The proxy relays whole messages only, so it can still say why: a FATAL, then the close.
      assert.match(ending, /^error (08006|57P01) /);
      // One FATAL: the backend's own 57P01 when it got through, otherwise the proxy's 08006; never both.
      assert.equal(errors, 1, 'exactly one ErrorResponse');
      assert.ok(w.closed, 'closed after the FATAL');
      w.socket.destroy();
      await noLeaks(tx, 0, 'after the stalled backend kill');
    });

    test('connection churn: 120 clients (half Terminate, half reset) leave no native socket and no file descriptor behind', T, async () => {
      const fds = (): number => readdirSync('/proc/self/fd').length;
      const pooled = (): number => tx.proxy.ctx.pools.all().reduce((n, p) => n + p.stats().idle + p.stats().active + p.stats().connecting, 0);
      const fdsBefore = fds();
      const pooledBefore = pooled();
      for (let round = 0; round < 3; round++) {
        await Promise.all(
          Array.from({ length: 40 }, async (_, i) => {
            const w = await wire();
            assert.deepEqual(rowOf((await w.simple(`SELECT ${i}`)).find((m) => m.type === 'D')!), [String(i)]);
            if (i % 2 === 0) await w.end();
            else w.socket.resetAndDestroy();
          }),
        );
      }
      await noLeaks(tx, 0, 'after the churn');
      if (native) await eventually(() => nativeSocketStats.open === accountedNative([tx, ses]), 3000, `native sockets (${nativeSocketStats.open}) = clients + pooled backends (${accountedNative([tx, ses])})`);
      else assert.equal(nativeSocketStats.open, 0);
      // Each pooled backend holds one descriptor; a client's (or its dup's) must not outlive it.
      await eventually(() => fds() - fdsBefore <= pooled() - pooledBefore + 6, 3000, `descriptors: ${fdsBefore} -> ${fds()} with ${pooledBefore} -> ${pooled()} pooled backends`);
    });

    test('a client that resets while it waits for a backend (pool exhausted): nothing leaks once the backend frees up', T, async () => {
      const small = await startProxy({
        admin: true,
        guardrails: false,
        patch: (c) => {
          patch(c);
          c.pool.max_connections = 1;
          c.pool.min_connections = 0;
          c.pool_mode.min_idle = 0;
          for (const tn of c.multi_tenancy.tenants) if (tn.pool) tn.pool.min_idle = 0;
        },
      });
      try {
        // Both log in first (a login takes the backend for a moment), then the holder keeps it.
        const waiter = await WireClient.connect(small.port);
        opened.push(waiter.socket);
        await waiter.login();
        const holder = await pgClient(small);
        await holder.query('BEGIN');
        await holder.query('SELECT 1');
        waiter.write(query("SELECT 'waiter' AS w"));
        await eventually(async () => (await metricsOf(small)).backends.waiting === 1, 3000, 'the waiter to queue for the backend');
        waiter.socket.resetAndDestroy();
        await sleep(200);
        await holder.query('COMMIT');
        const next = await pgClient(small);
        assert.equal((await within(next.query<{ v: number }>('SELECT 2 AS v'), 6000, 'a new client after the waiter left')).rows[0]!.v, 2);
        await Promise.all([holder.end(), next.end()]);
        await noLeaks(small, 0, 'after the waiter reset');
        const m = await metricsOf(small);
        assert.equal(m.backends.waiting, 0);
      } finally {
        await within(small.close(), 5000, 'closing the small proxy').catch(() => undefined);
      }
    });

    test('every idle pooled backend terminated: the pool notices each close, their sockets close, new clients are served', T, async () => {
      const c = await pgClient();
      await c.query('SELECT 1');
      await c.end();
      const idlePids = (): number[] => tx.proxy.ctx.pools.all().flatMap((p) => p.idle.map((conn) => conn.pid));
      await eventually(() => idlePids().length > 0, 3000, 'idle backends in the pool');
      const victims = idlePids();
      await monitor.query('SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p', [victims]);
      // Nobody uses them: only the backend's close, read on an idle socket, tells the pool.
      await eventually(() => idlePids().every((pid) => !victims.includes(pid)), 3000, `the pool to drop terminated backends ${victims.join(',')} (idle: ${idlePids().join(',')})`);
      const clients = await Promise.all(Array.from({ length: 4 }, () => pgClient()));
      for (const [i, d] of clients.entries()) {
        const r = await within(d.query<{ v: number }>('SELECT $1::int AS v', [i]), 5000, 'a query after the pool lost its backends');
        assert.equal(r.rows[0]!.v, i);
      }
      await Promise.all(clients.map((d) => d.end()));
      await noLeaks(tx, 0, 'after the idle backends were terminated');
      if (native) await eventually(() => nativeSocketStats.open === accountedNative([tx, ses]), 3000, `native sockets (${nativeSocketStats.open}) = clients + pooled backends (${accountedNative([tx, ses])})`);
    });

    // ── 6 ──
    for (const queryMode of ['simple', 'extended', 'prepared'] as const) {
      test(`pgbench -S -M ${queryMode} -c 8 -t 200 through the proxy: no errors`, T, async (t) => {
        const r = await pgbench(['-S', '-M', queryMode, '-n', '-c', '8', '-j', '2', '-t', '200', '-h', '127.0.0.1', '-p', String(tx.port), '-U', USER, DB]);
        const out = `${r.stdout}\n${r.stderr}`;
        assert.equal(r.code, 0, out);
        assert.doesNotMatch(out, /error|aborted/i, out);
        assert.match(r.stdout, /number of transactions actually processed: 1600\/1600/, out);
        const failed = Number(/number of failed transactions: (\d+)/.exec(r.stdout)?.[1] ?? 0);
        assert.equal(failed, 0);
        t.diagnostic(`${/^tps = ([\d.]+)/m.exec(r.stdout)?.[1] ?? '?'} tps`);
      });
    }

    // ── 7 ──
    test('postgres.js: 500 pipelined queries on one connection each get their own result', T, async () => {
      const sql = postgres({ host: '127.0.0.1', port: tx.port, user: USER, password: PASSWORD, database: DB, max: 1, onnotice: () => {} });
      try {
        const results = await within(
          Promise.all(Array.from({ length: 500 }, (_, i) => sql<{ i: number; pad: string }[]>`SELECT ${i}::int AS i, repeat('p', ${(i * 37) % 5000}::int) AS pad`)),
          15_000,
          '500 pipelined queries',
        );
        results.forEach((rows, i) => {
          assert.equal(rows.length, 1);
          assert.equal(rows[0]!.i, i);
          assert.equal(rows[0]!.pad.length, (i * 37) % 5000);
        });
      } finally {
        await sql.end({ timeout: 2 });
      }
    });

    test('300 queries in one write, and one query dribbled a byte at a time, are answered in order', T, async () => {
      const w = await wire();
      w.write(Buffer.concat(Array.from({ length: 300 }, (_, i) => query(`SELECT ${i} AS i`))));
      for (let i = 0; i < 300; i++) {
        const msgs = await w.untilReady(10_000);
        assert.deepEqual(rowOf(msgs.find((m) => m.type === 'D')!), [String(i)]);
      }
      const q = query("SELECT 'dribbled' AS d, 12345 AS n");
      for (const byte of q) {
        w.write(Buffer.from([byte]));
        await sleep(2);
      }
      const msgs = await w.untilReady();
      assert.deepEqual(rowOf(msgs.find((m) => m.type === 'D')!), ['dribbled', '12345']);
      await w.end();
    });

    // ── 8 ──
    test('cancel pg_sleep(10): postgres.js cancel(), psql on SIGINT and a raw CancelRequest each give 57014 within 2 s', T, async () => {
      // postgres.js
      const sql = postgres({ host: '127.0.0.1', port: tx.port, user: USER, password: PASSWORD, database: DB, max: 1, onnotice: () => {} });
      try {
        const q = sql`SELECT pg_sleep(10) AS pgjs_cancel`;
        const outcome = q.then(
          () => null,
          (e: unknown) => e,
        );
        await eventually(async () => (await pidRunning('pgjs_cancel')) !== null, 3000, 'postgres.js sleep to start');
        const t0 = Date.now();
        q.cancel();
        const err = await within(outcome, 2000, 'postgres.js cancel');
        assert.equal(codeOf(err), '57014', String(err));
        assert.ok(Date.now() - t0 < 2000);
        assert.deepEqual([...(await sql<{ one: number }[]>`SELECT 1 AS one`)], [{ one: 1 }]);
      } finally {
        await sql.end({ timeout: 2 });
      }

      // psql: SIGINT while the statement runs makes psql send a CancelRequest.
      const db = { PGPASSWORD: PASSWORD, PGCONNECT_TIMEOUT: '10' };
      const child = spawn(psqlBin(), ['-X', '-h', '127.0.0.1', '-p', String(tx.port), '-U', USER, '-d', DB, '-c', 'SELECT pg_sleep(10) AS psql_cancel'], {
        env: { ...process.env, ...db },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stderr = '';
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)));
      try {
        await eventually(async () => (await pidRunning('psql_cancel')) !== null, 5000, 'psql sleep to start');
        const t0 = Date.now();
        child.kill('SIGINT');
        const code = await within(exited, 2000, 'psql after SIGINT');
        assert.notEqual(code, 0);
        assert.match(stderr, /canceling statement due to user request/);
        assert.ok(Date.now() - t0 < 2000);
      } finally {
        if (child.exitCode === null) child.kill('SIGKILL');
      }

      // A raw CancelRequest with the key the proxy handed out.
      const w = await wire();
      assert.ok(w.keyData, 'BackendKeyData at login');
      w.write(query('SELECT pg_sleep(10) AS raw_cancel'));
      await eventually(async () => (await pidRunning('raw_cancel')) !== null, 3000, 'raw sleep to start');
      const t0 = Date.now();
      const cs = netConnect({ host: '127.0.0.1', port: tx.port });
      cs.on('error', () => {});
      cs.once('connect', () => cs.end(cancelRequest(w.keyData!.pid, w.keyData!.secret)));
      const msgs = await w.untilReady(2000);
      const e = msgs.find((m) => m.type === 'E');
      assert.ok(e, `an error: ${msgs.map((m) => m.type).join('')}`);
      assert.equal(errorFields(e).get('C'), '57014');
      assert.ok(Date.now() - t0 < 2000);
      assert.deepEqual(rowOf((await w.simple('SELECT 3')).find((m) => m.type === 'D')!), ['3']);
      await w.end();
      await noLeaks(tx, 0, 'after the cancels');
    });

    // ── 9 ──
    test(`reloading with the other socket_layer reports a restart and the running layer stays "${layer}"`, T, async () => {
      const other: Layer = native ? 'node' : 'native';
      const r = tx.proxy.apply(loadTestConfig({ guardrails: false, patch: (c) => (c.socket_layer = other) }));
      assert.ok(r.ok, JSON.stringify(r));
      assert.ok(r.restartRequired.includes('socket_layer'), JSON.stringify(r.restartRequired));
      assert.equal((await metricsOf(tx)).socket_layer.mode, layer);
      assert.equal(tx.proxy.ctx.config.socket_layer, layer, 'the running config keeps the layer it started with');
      const open = nativeSocketStats.open;
      const w = await wire();
      assert.deepEqual(rowOf((await w.simple('SELECT 1')).find((m) => m.type === 'D')!), ['1']);
      if (native) assert.ok(nativeSocketStats.open > open, 'a new client still goes native');
      else assert.equal(nativeSocketStats.open, 0, 'a new client still stays on Node');
      await w.end();
    });

    test('proxy shutdown while a client is stalled mid-result: once it reads, queued rows in order, then 57P01 and the close', T, async (t) => {
      const p = await startProxy({ admin: true, guardrails: false, patch });
      let closing: Promise<void> | null = null;
      try {
        const idle = await wire(p);
        const w = await wire(p);
        w.socket.pause();
        w.write(query("SELECT i, repeat('s', 1000) AS pad FROM generate_series(1, 50000) i"));
        await sleep(500);
        closing = p.close();
        // The idle client is told at once.
        const m = await idle.next(3000);
        assert.equal(m.type, 'E');
        assert.equal(errorFields(m).get('C'), '57P01');
        await sleep(300);
        w.socket.resume();
        const read = await readNumberedRows(w, 5000);
        const last = read.errors.at(-1);
        const ending = last !== undefined ? `error ${errorFields(last).get('C')}` : (read.closed ?? '');
        t.diagnostic(`${read.rows} rows, then ${ending}`);
        assert.equal(ending, 'error 57P01');
        assert.ok(w.closed);
        await within(closing, 5000, 'proxy.close()');
      } finally {
        await within(closing ?? p.close(), 5000, 'closing the proxy').catch(() => undefined);
      }
    });

    // ── a peer that closes and then resets before its close was read ──
    // Regression tests. The first version of NativeSocket.end() took shutdown()'s -ENOTCONN for "nothing to
    // do" and destroyed nothing: a socket whose peer closed (FIN) and then reset (RST, on bytes sent after that
    // FIN) before the FIN was read ended with readableEnded and writableEnded set, nothing queued, reading off,
    // and no event left to come. The session never saw 'close': its client count, its descriptor and
    // nativeSocketStats leaked, and proxy.close() left the socket open.

    test('io layer: a peer that closes (FIN) and resets (RST) before its FIN is read: the socket closes', T, async () => {
      // "a" stands for a client socket of the proxy, "b" for its backend.
      const pair = await acceptedPair(native);
      const [peerA, peerB] = pair.peers;
      const [a, b] = pair.sockets;
      peerA.on('error', () => {});
      peerB.on('error', () => {});
      a.on('error', () => {});
      b.on('error', () => {});
      const aClosed = new Promise<void>((r) => a.on('close', () => r()));
      const aEnded = new Promise<void>((r) => a.on('end', () => r()));
      // b's bytes (the backend's answer) are relayed to a, as the proxy does.
      b.on('data', () => a.write(Buffer.alloc(1024, 0x41)));
      try {
        // In one turn of the event loop: bytes for b, then peerA's close (FIN; it has nothing unread). The
        // next poll sees b then a readable: relaying b's bytes to a makes peerA's kernel answer with RST,
        // so a's socket is reset before its FIN (already seen as readable) is read.
        peerB.write('x');
        peerA.destroy();
        await within(aEnded, 2000, "a's 'end'");
        await within(aClosed, 2000, "a's 'close' after its peer closed and reset");
      } finally {
        pair.close();
      }
    });

    // The native layer hands every socket's reads of one event-loop turn to JS together: a socket paused
    // while an earlier read of that turn is handled must still emit nothing until it is resumed.
    test('io layer: a socket paused by the handler of another socket\'s read in the same turn emits nothing until resumed, then its bytes in order', T, async () => {
      const pair = await acceptedPair(native);
      const { peers, sockets } = pair;
      const got: string[][] = [[], []];
      let paused = -1;
      let emittedWhilePaused = false;
      for (const i of [0, 1]) {
        sockets[i]!.on('data', (chunk: Buffer) => {
          if (paused === i && sockets[i]!.isPaused()) emittedWhilePaused = true;
          got[i]!.push(chunk.toString());
          if (paused === -1) {
            paused = 1 - i;
            sockets[paused]!.pause();
          }
        });
      }
      try {
        // Both peers write in one turn: both sockets are readable in the same poll.
        peers[0].write('zero');
        peers[1].write('one');
        await eventually(() => paused !== -1, 2000, 'a first read');
        await sleep(100);
        const p = paused;
        assert.equal(emittedWhilePaused, false, 'no data while paused');
        assert.deepEqual(got[p], [], 'nothing for the paused socket yet');
        peers[p]!.write('+more');
        await sleep(50);
        assert.deepEqual(got[p], [], 'still nothing while paused');
        sockets[p]!.resume();
        const want = `${p === 0 ? 'zero' : 'one'}+more`;
        await eventually(() => got[p]!.join('') === want, 2000, `the paused socket's bytes after resume (${got[p]!.join('|')})`);
        await sleep(50);
        assert.equal(got[p]!.join(''), want, 'each byte once, in order');
        assert.equal(emittedWhilePaused, false);
      } finally {
        pair.close();
      }
    });

    test('a client that closes while its result is on the way (its FIN and the result cross): the session ends, nothing leaks', T, async () => {
      const before = await acmeClients(tx);
      const sessionsBefore = new Set(tx.proxy.ctx.sessions);
      const w = await wire();
      try {
        w.write(query('SELECT pg_sleep(0.2) AS crossing'));
        await eventually(async () => (await pidRunning('crossing')) !== null, 3000, 'the statement to start');
        // Hold the event loop (the proxy's too) until the answer waits in the proxy's backend socket, then
        // close the client (FIN: nothing unread). The proxy then relays the answer before it reads the FIN;
        // the client's kernel answers that with RST.
        const until = Date.now() + 400;
        while (Date.now() < until) {
          /* spin: the answer arrives meanwhile */
        }
        w.socket.destroy();
        await noLeaks(tx, before, 'after the client closed under its result');
      } finally {
        // A leaked session is ended by hand so the tests after this one start clean.
        for (const sess of tx.proxy.ctx.sessions) if (!sessionsBefore.has(sess)) sess.socket.destroy();
      }
    });

    test("io layer: 'data' listeners behave as EventEmitter's (on, once, prepend, off, listenerCount)", T, async () => {
      const server = createServer();
      await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
      const port = (server.address() as { port: number }).port;
      const accepted = new Promise<Socket>((r) => server.once('connection', r));
      const peer = await new Promise<Socket>((resolve, reject) => {
        const c = netConnect({ host: '127.0.0.1', port }, () => resolve(c));
        c.once('error', reject);
      });
      const raw = await accepted;
      raw.on('error', () => {});
      const s: ByteStream = native ? adoptSocket(raw)! : raw;
      assert.ok(s !== null, 'adopted');
      const calls: string[] = [];
      const chunkArrived = (): Promise<void> => new Promise((r) => setTimeout(r, 50));
      try {
        const a = (c: Buffer): void => void calls.push(`a:${c.toString()}`);
        const b = (c: Buffer): void => void calls.push(`b:${c.toString()}`);
        const c = (ch: Buffer): void => void calls.push(`c:${ch.toString()}`);
        s.on('data', a);
        assert.equal((s as unknown as { listenerCount(e: string): number }).listenerCount('data'), 1);
        peer.write('1');
        await chunkArrived();
        s.once('data', b);
        (s as unknown as { prependListener(e: string, l: (c: Buffer) => void): void }).prependListener('data', c);
        assert.equal((s as unknown as { listenerCount(e: string): number }).listenerCount('data'), 3);
        peer.write('2');
        await chunkArrived();
        s.off('data', a);
        peer.write('3');
        await chunkArrived();
        s.off('data', c);
        assert.equal((s as unknown as { listenerCount(e: string): number }).listenerCount('data'), 0);
        peer.write('4');
        await chunkArrived();
        s.on('data', a);
        s.once('data', b);
        s.off('data', b); // a once() listener is removed by the function given, as with EventEmitter
        peer.write('5');
        await chunkArrived();
        assert.deepEqual(calls, ['a:1', 'c:2', 'a:2', 'b:2', 'c:3', 'a:5']);
      } finally {
        peer.destroy();
        s.destroy();
        server.close();
      }
    });

    test('io layer: a listener that throws surfaces as an uncaught exception; no bytes are lost and other sockets go on', T, async () => {
      const script = join(tmp, 'throwing-listener.mts');
      writeFileSync(script, THROWING_LISTENER_CHILD);
      const r = await run(process.execPath, ['--import', 'tsx', script, layer], { cwd: fileURLToPath(new URL('..', import.meta.url)) });
      assert.equal(r.code, 0, r.stderr);
      const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as { uncaught: string[]; received: string[]; laterCall: string };
      assert.deepEqual({ ...out, received: [...out.received].sort() }, { uncaught: ['listener bug'], received: ['a:one', 'a:two', 'b:three'], laterCall: 'ok' });
    });

    // ── leak check ──
    test('after the proxies close, no native socket is left open', T, async () => {
      closed = true;
      await within(Promise.all([tx.close(), ses.close()]), 10_000, 'proxy.close()');
      await eventually(() => nativeSocketStats.open === 0, 5000, `native sockets to close (${nativeSocketStats.open} still open)`);
    });
  });
}
