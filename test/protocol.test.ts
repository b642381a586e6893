// Raw wire-protocol edge cases against the proxy: SSL/GSSENC negotiation, malformed and garbage input,
// CancelRequest routing, Terminate and client disconnects, extended-protocol pipelining, COPY and
// unsynced extended-protocol work by hand. Every case runs in session and transaction pooling mode; where
// PostgreSQL's own answer is the spec, the same bytes are first sent to the cluster directly.
// The proxy runs the reference configuration with its guardrails enforced; the COPY cases (COPY is not in
// acme's allowed_operations) go through a second proxy started with guardrails: false.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { connect as netConnect, type Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import postgres from 'postgres';
import {
  bindText,
  cancelRequest,
  closeStatement,
  decodeErrorFields,
  execute,
  GSSENC_REQUEST_CODE,
  parse,
  passwordMessage,
  query,
  SSL_REQUEST_CODE,
  startupMessage,
  SYNC,
  TERMINATE,
  writer,
} from '../src/protocol/messages.js';
import { ScramClientExchange } from '../src/auth/scram.js';
import { runPsql, testPg } from './helpers/pg.js';
import { direct, eventually, startProxy, type TestProxy } from './helpers/proxy.js';

const USER = 'acme.appuser';
const DB = 'shared_db';
const PASSWORD = 'apppass';

/** One backend message: its type letter, its body (after the length) and the whole message. */
interface BackendMessage {
  type: string;
  body: Buffer;
  raw: Buffer;
}

interface LoginResult {
  params: Map<string, string>;
  keyData: { pid: number; secret: number } | null;
}

/** A hand-driven PostgreSQL client on a plain socket. */
class RawClient {
  private buf: Buffer = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  closed = false;

  private constructor(readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => {});
  }

  static connect(port: number, host = '127.0.0.1'): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = netConnect({ host, port, noDelay: true });
      s.once('connect', () => {
        s.off('error', reject);
        resolve(new RawClient(s));
      });
      s.once('error', reject);
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  private async waitFor<T>(take: () => T | null, ms: number, what: string): Promise<T> {
    const until = Date.now() + ms;
    for (;;) {
      const v = take();
      if (v !== null) return v;
      if (this.closed) throw new Error(`connection closed while waiting for ${what}`);
      const left = until - Date.now();
      if (left <= 0) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  write(data: Buffer): void {
    this.socket.write(data);
  }

  /** Bytes received and not consumed yet. */
  get pending(): number {
    return this.buf.length;
  }

  readByte(ms = 3000): Promise<string> {
    return this.waitFor(
      () => {
        if (this.buf.length < 1) return null;
        const c = String.fromCharCode(this.buf[0]!);
        this.buf = this.buf.subarray(1);
        return c;
      },
      ms,
      'a single byte',
    );
  }

  readMessage(ms = 5000): Promise<BackendMessage> {
    return this.waitFor(
      () => {
        if (this.buf.length < 5) return null;
        const len = this.buf.readInt32BE(1);
        if (this.buf.length < len + 1) return null;
        const raw = this.buf.subarray(0, len + 1);
        this.buf = this.buf.subarray(len + 1);
        return { type: String.fromCharCode(raw[0]!), body: raw.subarray(5), raw };
      },
      ms,
      'a message',
    );
  }

  /** Reads messages up to and including the first of type `type`. */
  async readUntil(type: string, ms = 5000): Promise<BackendMessage[]> {
    const until = Date.now() + ms;
    const out: BackendMessage[] = [];
    for (;;) {
      const m = await this.readMessage(Math.max(1, until - Date.now()));
      out.push(m);
      if (m.type === type) return out;
    }
  }

  /** Resolves once the proxy closed the connection (after reading whatever it sent first). */
  waitClosed(ms = 3000): Promise<void> {
    return this.waitFor(() => (this.closed ? true : null), ms, 'the connection to close').then(() => undefined);
  }

  /** Everything received so far as messages (for a closed connection). */
  drainMessages(): BackendMessage[] {
    const out: BackendMessage[] = [];
    while (this.buf.length >= 5) {
      const len = this.buf.readInt32BE(1);
      if (this.buf.length < len + 1) break;
      const raw = this.buf.subarray(0, len + 1);
      this.buf = this.buf.subarray(len + 1);
      out.push({ type: String.fromCharCode(raw[0]!), body: raw.subarray(5), raw });
    }
    return out;
  }

  /** StartupMessage (optionally after bytes already exchanged), password, up to ReadyForQuery. */
  async login(user = USER, database = DB, password = PASSWORD): Promise<LoginResult> {
    this.write(startupMessage({ user, database }));
    const params = new Map<string, string>();
    let keyData: LoginResult['keyData'] = null;
    let scram: ScramClientExchange | null = null;
    for (;;) {
      const m = await this.readMessage();
      switch (m.type) {
        case 'R': {
          const code = m.body.readInt32BE(0);
          if (code === 3) this.write(passwordMessage(password));
          else if (code === 5) {
            const inner = createHash('md5').update(password + user).digest('hex');
            const outer = createHash('md5').update(Buffer.concat([Buffer.from(inner), m.body.subarray(4, 8)])).digest('hex');
            this.write(passwordMessage('md5' + outer));
          } else if (code === 10) {
            scram = new ScramClientExchange({ password });
            const first = scram.clientFirst();
            this.write(writer(0x70).cstring('SCRAM-SHA-256').int32(first.length).bytes(first).done());
          } else if (code === 11 && scram !== null) {
            this.write(writer(0x70).bytes(await scram.clientFinal(Buffer.from(m.body.subarray(4)))).done());
          } else if (code === 12 && scram !== null) {
            if (!scram.verifyServerFinal(m.body.subarray(4))) throw new Error('server SCRAM signature did not verify');
          } else if (code !== 0) throw new Error(`RawClient cannot answer authentication request ${code}`);
          break;
        }
        case 'S': {
          const [name, value] = m.body.toString('utf8').split('\0');
          params.set(name!, value!);
          break;
        }
        case 'K':
          keyData = { pid: m.body.readInt32BE(0), secret: m.body.readInt32BE(4) };
          break;
        case 'E':
          throw new Error(`login failed: ${errorOf(m).get('M')}`);
        case 'Z':
          return { params, keyData };
        default:
          break;
      }
    }
  }

  /** A simple Query, read up to its ReadyForQuery. */
  async simple(sql: string, ms = 5000): Promise<BackendMessage[]> {
    this.write(query(sql));
    return this.readUntil('Z', ms);
  }

  destroy(): void {
    this.socket.destroy();
  }
}

function errorOf(m: BackendMessage): Map<string, string> {
  return decodeErrorFields(m.raw, 0, m.raw.length);
}

function dataRows(msgs: BackendMessage[]): (string | null)[][] {
  return msgs
    .filter((m) => m.type === 'D')
    .map((m) => {
      const n = m.body.readInt16BE(0);
      const row: (string | null)[] = [];
      let o = 2;
      for (let i = 0; i < n; i++) {
        const len = m.body.readInt32BE(o);
        o += 4;
        if (len < 0) row.push(null);
        else {
          row.push(m.body.toString('utf8', o, o + len));
          o += len;
        }
      }
      return row;
    });
}

function types(msgs: BackendMessage[]): string {
  return msgs.map((m) => m.type).join('');
}

/** An untyped startup-phase packet: int32 length + int32 code. */
function requestCode(code: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeInt32BE(8, 0);
  b.writeInt32BE(code, 4);
  return b;
}

/** Deterministic pseudo-random bytes (mulberry32) so a failing garbage case can be replayed. */
function garbage(seed: number, n: number): Buffer {
  let a = seed >>> 0;
  const out = Buffer.alloc(n);
  for (let i = 0; i < n; i++) {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = ((t ^ (t >>> 14)) >>> 0) & 0xff;
  }
  return out;
}

/** Backend connections currently checked out of the proxy's pools. */
function checkedOut(p: TestProxy): number {
  return p.proxy.ctx.pools.all().reduce((n, pool) => n + pool.stats().active, 0);
}

/** Active backends (as the superuser sees them) whose query text contains `marker`. */
async function activeWith(marker: string): Promise<number> {
  const rows = await direct<{ n: number }>(
    "SELECT count(*)::int AS n FROM pg_stat_activity WHERE state <> 'idle' AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
    'postgres',
    [marker],
  );
  return rows[0]!.n;
}

/** Every test gets a deadline: a proxy that stops answering fails the test instead of stalling the suite. */
const T = { timeout: 20_000 };

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Ends a node-postgres client without ever hanging on a proxy that stopped answering it. */
async function closePg(c: pg.Client): Promise<void> {
  const ended = c.end().catch(() => undefined);
  await Promise.race([ended, sleep(1000)]);
  c.connection.stream.destroy();
}

for (const mode of ['session', 'transaction'] as const) {
  describe(`raw protocol through the proxy (${mode} mode)`, () => {
    let p: TestProxy;
    /** The same proxy without rate_limits and permissions, for COPY (schema isolation still holds). */
    let open: TestProxy;
    const table = `acme.protocol_${mode}`;
    const raws: RawClient[] = [];
    const pgs: pg.Client[] = [];

    const raw = async (via: TestProxy = p): Promise<RawClient> => {
      const r = await RawClient.connect(via.port);
      raws.push(r);
      return r;
    };
    /** A node-postgres client that gives up instead of hanging when the proxy stops answering. */
    const pgClient = async (): Promise<pg.Client> => {
      const c = new pg.Client({ ...p.clientConfig(USER, DB), connectionTimeoutMillis: 3000, query_timeout: 5000 });
      c.on('error', () => {});
      pgs.push(c);
      await c.connect();
      return c;
    };
    /** The proxy still serves a brand-new client. */
    const stillServes = async (): Promise<void> => {
      const c = await pgClient();
      const r = await c.query<{ n: number }>('SELECT count(*)::int AS n FROM orders');
      assert.equal(r.rows[0]!.n, 3);
      await c.end();
    };
    /** With no client connected, every backend goes back to the pool (of both proxies). */
    const allReturned = (what = 'every backend to be back in its pool'): Promise<void> =>
      eventually(() => checkedOut(p) + checkedOut(open) === 0, 3000, what);
    const bye = async (r: RawClient): Promise<void> => {
      r.write(TERMINATE);
      await r.waitClosed();
    };

    before(async () => {
      p = await startProxy({ mode });
      open = await startProxy({ mode, guardrails: false });
      await direct(`DROP TABLE IF EXISTS ${table}; CREATE TABLE ${table} (id int PRIMARY KEY, note text); ALTER TABLE ${table} OWNER TO appuser`, DB);
    });
    after(async () => {
      for (const r of raws) r.destroy();
      await Promise.all(pgs.map(closePg));
      // A backend wedged by a proxy bug would keep this process alive: drop whatever is still checked out.
      for (const q of [p, open]) {
        if (q === undefined) continue;
        for (const pool of q.proxy.ctx.pools.all()) for (const c of [...pool.busy]) c.destroy(null);
        await q.close();
      }
      await direct(`DROP TABLE IF EXISTS ${table}`, DB);
    });

    test('startup reports ParameterStatus and BackendKeyData, then queries work', T, async () => {
      const r = await raw();
      const { params, keyData } = await r.login();
      assert.ok(params.get('server_version'), 'server_version reported');
      assert.equal(params.get('client_encoding'), 'UTF8');
      assert.ok(keyData !== null, 'BackendKeyData sent');
      const res = await r.simple('SELECT customer FROM orders ORDER BY id');
      assert.equal(types(res), 'TDDDCZ');
      assert.deepEqual(dataRows(res), [['acme-customer-1'], ['acme-customer-2'], ['acme-customer-3']]);
      await bye(r);
    });

    test('SSLRequest is answered N and a normal startup follows on the same socket', T, async () => {
      const r = await raw();
      r.write(requestCode(SSL_REQUEST_CODE));
      assert.equal(await r.readByte(), 'N');
      await r.login();
      assert.deepEqual(dataRows(await r.simple('SELECT 41 + 1')), [['42']]);
      await bye(r);
    });

    test('psql with sslmode=prefer connects; sslmode=require is refused', T, async () => {
      const args = ['-h', '127.0.0.1', '-p', String(p.port), '-U', USER, '-d', DB, '-At', '-w', '-c', 'SELECT 1'];
      const ok = await runPsql(args, { PGPASSWORD: PASSWORD, PGSSLMODE: 'prefer' });
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal(ok.stdout.trim(), '1');
      const refused = await runPsql(args, { PGPASSWORD: PASSWORD, PGSSLMODE: 'require' });
      assert.notEqual(refused.code, 0);
      assert.match(refused.stderr, /does not support SSL/);
    });

    test('GSSENCRequest is answered N; an SSLRequest and a startup may follow', T, async () => {
      const r = await raw();
      r.write(requestCode(GSSENC_REQUEST_CODE));
      assert.equal(await r.readByte(), 'N');
      r.write(requestCode(SSL_REQUEST_CODE));
      assert.equal(await r.readByte(), 'N');
      await r.login();
      assert.deepEqual(dataRows(await r.simple('SELECT 7')), [['7']]);
      await bye(r);
    });

    test('psql with gssencmode=prefer connects', T, async () => {
      // libpq only sends GSSENCRequest when it holds Kerberos credentials; the by-hand test above covers the bytes.
      const args = ['-h', '127.0.0.1', '-p', String(p.port), '-U', USER, '-d', DB, '-At', '-w', '-c', 'SELECT 2'];
      const r = await runPsql(args, { PGPASSWORD: PASSWORD, PGGSSENCMODE: 'prefer', PGSSLMODE: 'prefer' });
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), '2');
    });

    test('a typed message with length 2 gets 08P01 and the connection closes; others are still served', T, async () => {
      const r = await raw();
      await r.login();
      r.write(Buffer.from([0x51, 0, 0, 0, 2])); // 'Q' with a length smaller than itself
      await r.waitClosed();
      const msgs = r.drainMessages();
      const err = msgs.find((m) => m.type === 'E');
      assert.ok(err, `expected an ErrorResponse, got ${types(msgs)}`);
      assert.equal(errorOf(err).get('C'), '08P01');
      await stillServes();
    });

    test('a startup packet with length 5 gets 08P01 and the connection closes', T, async () => {
      const r = await raw();
      r.write(Buffer.from([0, 0, 0, 5, 0]));
      await r.waitClosed();
      const msgs = r.drainMessages();
      assert.equal(types(msgs), 'E');
      assert.equal(errorOf(msgs[0]!).get('C'), '08P01');
      await stillServes();
    });

    test('an oversized startup length and an oversized typed length get 08P01', T, async () => {
      const a = await raw();
      a.write(Buffer.from([0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]));
      await a.waitClosed();
      assert.equal(errorOf(a.drainMessages()[0]!).get('C'), '08P01');

      const b = await raw();
      await b.login();
      b.write(Buffer.from([0x51, 0x7f, 0xff, 0xff, 0xff]));
      await b.waitClosed();
      const err = b.drainMessages().find((m) => m.type === 'E');
      assert.ok(err);
      assert.equal(errorOf(err).get('C'), '08P01');
      await stillServes();
    });

    test('protocol version 2.0 is refused with 0A000', T, async () => {
      const r = await raw();
      const msg = startupMessage({ user: USER, database: DB });
      msg.writeInt32BE(2 << 16, 4);
      r.write(msg);
      await r.waitClosed();
      const msgs = r.drainMessages();
      assert.equal(types(msgs), 'E');
      assert.equal(errorOf(msgs[0]!).get('C'), '0A000');
    });

    test('random garbage after startup does not take the proxy down', T, async () => {
      for (let seed = 1; seed <= 12; seed++) {
        const r = await raw();
        await r.login();
        r.write(garbage(seed, 4096));
        // The proxy may close, answer an error, or wait for the rest of a "message": any is fine.
        await r.waitClosed(300).catch(() => r.destroy());
      }
      // Garbage that starts like a real message (Parse, Bind, Describe, Close, Execute, FunctionCall), then Sync.
      const typed = [0x50, 0x42, 0x44, 0x43, 0x45, 0x46];
      for (let i = 0; i < typed.length; i++) {
        const r = await raw();
        await r.login();
        r.write(Buffer.concat([writer(typed[i]!).bytes(garbage(100 + i, 64)).done(), SYNC]));
        await r.readUntil('Z', 2000).catch(() => undefined);
        r.destroy();
      }
      await stillServes();
    });

    test('random garbage instead of a startup packet does not take the proxy down', T, async () => {
      for (let seed = 200; seed < 210; seed++) {
        const r = await raw();
        r.write(garbage(seed, 512));
        await r.waitClosed(300).catch(() => r.destroy());
      }
      await stillServes();
    });

    test('CancelRequest: a wrong secret does nothing, the right one cancels only that client', T, async () => {
      const a = await raw();
      const { keyData } = await a.login();
      assert.ok(keyData !== null);
      const marker = `hp_cancel_a_${mode}`;
      a.write(query(`SELECT pg_sleep(10) /* ${marker} */`));
      await eventually(async () => (await activeWith(marker)) === 1, 3000, 'the sleep to start');

      const b = await pgClient();
      const bStarted = Date.now();
      const bDone = b.query(`SELECT pg_sleep(2) /* hp_cancel_b_${mode} */`).then(() => Date.now() - bStarted);

      const sendCancel = async (pid: number, secret: number): Promise<void> => {
        const c = await raw();
        c.write(cancelRequest(pid, secret));
        await c.waitClosed();
      };
      await sendCancel(keyData.pid, keyData.secret ^ 0x5a5a5a5a);
      await sendCancel(keyData.pid ^ 0x1234, keyData.secret);
      await sleep(300); // proving a negative needs a little time
      assert.equal(a.pending, 0, 'a wrong CancelRequest must not cancel anything');
      assert.equal(await activeWith(marker), 1);

      const cancelledAt = Date.now();
      await sendCancel(keyData.pid, keyData.secret);
      const res = await a.readUntil('Z', 3000);
      assert.ok(Date.now() - cancelledAt < 3000);
      const err = res.find((m) => m.type === 'E');
      assert.ok(err, `expected an error, got ${types(res)}`);
      assert.equal(errorOf(err).get('C'), '57014');

      const bMs = await bDone; // B completes normally
      assert.ok(bMs >= 1900, `B's pg_sleep(2) finished after ${bMs} ms: it was cut short`);

      // A's connection stays usable after its statement was cancelled.
      assert.deepEqual(dataRows(await a.simple('SELECT 1')), [['1']]);
      await bye(a);
      await b.end();
    });

    test('postgres.js query.cancel() through the proxy cancels with 57014', T, async () => {
      const sql = postgres({ host: '127.0.0.1', port: p.port, user: USER, password: PASSWORD, database: DB, max: 1, onnotice: () => {} });
      try {
        const marker = `hp_pgjs_cancel_${mode}`;
        const q = sql.unsafe(`SELECT pg_sleep(10) /* ${marker} */`);
        const started = Date.now();
        const result = q.then(
          () => null,
          (e: unknown) => e,
        );
        await eventually(async () => (await activeWith(marker)) === 1, 3000, 'the sleep to start');
        q.cancel();
        const err = await result;
        assert.ok(err instanceof Error && 'code' in err, `expected a PostgreSQL error, got ${String(err)}`);
        assert.equal(err.code, '57014');
        assert.ok(Date.now() - started < 4000);
        const [row] = await sql`SELECT 1 AS one`;
        assert.equal(row!.one, 1);
      } finally {
        await sql.end({ timeout: 1 });
      }
    });

    test('a CancelRequest for an idle client cancels nobody', T, async () => {
      const a = await raw();
      const { keyData } = await a.login();
      assert.ok(keyData !== null);
      assert.deepEqual(dataRows(await a.simple('SELECT 1')), [['1']]);
      // In transaction mode B most likely lands on the backend A just gave back.
      const b = await pgClient();
      const bStarted = Date.now();
      const bDone = b.query('SELECT pg_sleep(1)').then(() => Date.now() - bStarted);
      await sleep(200);
      const c = await raw();
      c.write(cancelRequest(keyData.pid, keyData.secret));
      await c.waitClosed();
      const bMs = await bDone;
      assert.ok(bMs >= 900, `B was cut short after ${bMs} ms`);
      assert.deepEqual(dataRows(await a.simple('SELECT 2')), [['2']]);
      await bye(a);
      await b.end();
    });

    test('Terminate closes cleanly and gives the backend back', T, async () => {
      await allReturned('the backends of earlier tests to come back');
      const r = await raw();
      await r.login();
      await r.simple('SELECT 1');
      r.write(TERMINATE);
      await r.waitClosed();
      assert.equal(r.drainMessages().length, 0, 'nothing is sent after Terminate');
      await allReturned('the backend to be given back after Terminate');
      await stillServes();
    });

    test('Terminate inside an open transaction rolls it back', T, async () => {
      const r = await raw();
      await r.login();
      await r.simple('BEGIN');
      const ins = await r.simple(`INSERT INTO ${table} VALUES (1, 'terminated')`);
      assert.equal(types(ins), 'CZ');
      await bye(r);
      await allReturned();
      assert.equal((await direct(`SELECT 1 FROM ${table}`, DB)).length, 0);
    });

    test('a query pipelined just before Terminate still completes, as PostgreSQL does', T, async () => {
      const insertThenTerminate = async (r: RawClient, id: number): Promise<void> => {
        r.write(Buffer.concat([query(`INSERT INTO ${table} SELECT ${id}, 'before-terminate' FROM pg_sleep(0.5)`), TERMINATE]));
        await r.waitClosed(3000).catch(() => r.destroy());
      };
      // The reference: the same bytes sent to PostgreSQL directly.
      const db = testPg();
      const reference = await RawClient.connect(db.port, db.host);
      raws.push(reference);
      await reference.login('appuser', DB, PASSWORD);
      const proxied = await raw();
      await proxied.login();
      await Promise.all([insertThenTerminate(reference, 20), insertThenTerminate(proxied, 21)]);
      await eventually(async () => (await activeWith('before-terminate')) === 0, 3000, 'the inserts to finish');
      const rows = await direct<{ id: number }>(`SELECT id FROM ${table} WHERE note = 'before-terminate' ORDER BY id`, DB);
      await direct(`DELETE FROM ${table}`, DB);
      assert.deepEqual(
        rows.map((r) => r.id),
        [20, 21],
        'PostgreSQL runs a query that arrived before Terminate (id 20); through the proxy it must too (id 21)',
      );
    });

    test('a client that disconnects during a long query gets its backend query stopped', T, async () => {
      await allReturned('the backends of earlier tests to come back');
      const r = await raw();
      await r.login();
      const marker = `hp_disconnect_${mode}`;
      r.write(query(`SELECT pg_sleep(5) /* ${marker} */`));
      await eventually(async () => (await activeWith(marker)) === 1, 3000, 'the sleep to start');
      r.destroy();
      await eventually(async () => (await activeWith(marker)) === 0, 2500, 'the abandoned pg_sleep to stop');
      await allReturned('the backend to be given back');
      await stillServes();
    });

    test('extended protocol pipelined by hand, with an error in the middle', T, async () => {
      const r = await raw();
      await r.login();
      // Three executions in one Sync: the second fails at Execute, the third is skipped.
      r.write(
        Buffer.concat([
          parse('', 'SELECT $1::int * 2'),
          bindText('', '', ['21']),
          execute(''),
          parse('', 'SELECT 1 / (g - 1) FROM generate_series(1, 1) g'),
          bindText('', '', []),
          execute(''),
          parse('', 'SELECT 3'),
          bindText('', '', []),
          execute(''),
          SYNC,
          // A second batch after the Sync runs normally.
          parse('', 'SELECT $1::text'),
          bindText('', '', ['after']),
          execute(''),
          SYNC,
        ]),
      );
      const first = await r.readUntil('Z');
      assert.equal(types(first), '12DC12EZ');
      assert.equal(errorOf(first[6]!).get('C'), '22012');
      const second = await r.readUntil('Z');
      assert.equal(types(second), '12DCZ');
      assert.deepEqual(dataRows(first), [['42']]);
      assert.deepEqual(dataRows(second), [['after']]);
      await bye(r);
    });

    test('COPY refused by acme\'s permissions: 42501 instead of CopyInResponse (simple and extended), the connection carries on', T, async () => {
      const r = await raw();
      await r.login();
      const simple = await r.simple(`COPY ${table} (id, note) FROM STDIN`);
      assert.equal(types(simple), 'EZ');
      assert.equal(errorOf(simple[0]!).get('C'), '42501');
      assert.match(errorOf(simple[0]!).get('M') ?? '', /tenant "acme".*COPY/);
      // Extended: refused at Parse; Bind and Execute are skipped up to the Sync, as PostgreSQL does after an error.
      r.write(Buffer.concat([parse('', `COPY ${table} (id, note) FROM STDIN`), bindText('', '', []), execute(''), SYNC]));
      const extended = await r.readUntil('Z');
      assert.equal(types(extended), 'EZ');
      assert.equal(errorOf(extended[0]!).get('C'), '42501');
      assert.deepEqual(dataRows(await r.simple(`SELECT count(*) FROM ${table}`)), [['0']]);
      await bye(r);
      await allReturned();
    });

    test('COPY FROM STDIN ended by CopyFail: 57014, and the connection carries on', T, async () => {
      const r = await raw(open); // COPY is outside acme's allowed_operations
      await r.login();
      r.write(query(`COPY ${table} (id, note) FROM STDIN`));
      assert.equal((await r.readMessage()).type, 'G');
      r.write(Buffer.concat([writer(0x64).bytes(Buffer.from('1\tcopyfail\n')).done(), writer(0x66).cstring('client gave up').done()]));
      const res = await r.readUntil('Z');
      assert.equal(types(res), 'EZ');
      assert.equal(errorOf(res[0]!).get('C'), '57014');
      assert.deepEqual(dataRows(await r.simple(`SELECT count(*) FROM ${table}`)), [['0']]);
      await bye(r);
      await allReturned();
    });

    test('COPY FROM STDIN through the extended protocol (the Sync sent during copy-in is ignored)', T, async () => {
      // What PostgreSQL answers: libpq sends exactly these bytes for PQexecParams("COPY … FROM STDIN").
      const copyBatch = async (r: RawClient, id: number): Promise<string> => {
        r.write(Buffer.concat([parse('', `COPY ${table} (id, note) FROM STDIN`), bindText('', '', []), execute(''), SYNC]));
        const head = await r.readUntil('G');
        r.write(Buffer.concat([writer(0x64).bytes(Buffer.from(`${id}\textended-copy\n`)).done(), writer(0x63).done(), SYNC]));
        const tail = await r.readUntil('Z');
        return types([...head, ...tail]);
      };
      const db = testPg();
      const reference = await RawClient.connect(db.port, db.host);
      raws.push(reference);
      await reference.login('appuser', DB, PASSWORD);
      const expected = await copyBatch(reference, 30);
      assert.equal(expected, '12GCZ');
      await bye(reference);

      await allReturned('the backends of earlier tests to come back');
      const r = await raw(open); // COPY is outside acme's allowed_operations
      try {
        await r.login();
        assert.equal(await copyBatch(r, 31), expected);
        // Nothing is left in flight: the next statements answer in order and the backend goes back when idle.
        assert.deepEqual(dataRows(await r.simple(`SELECT id FROM ${table} ORDER BY id`)), [['30'], ['31']]);
        assert.deepEqual(dataRows(await r.simple('SELECT 5')), [['5']]);
        if (mode === 'transaction') await allReturned('the backend to be released after an extended-protocol COPY');
        await bye(r);
        await allReturned();
      } finally {
        r.destroy();
        await direct(`DELETE FROM ${table}`, DB);
      }
    });

    test('a named statement keeps working whichever backend serves the next transaction', T, async () => {
      const r = await raw();
      await r.login();
      r.write(Buffer.concat([parse('s1', 'SELECT $1::int + 1, pg_backend_pid()'), SYNC]));
      assert.equal(types(await r.readUntil('Z')), '1Z');
      const pids = new Set<string>();
      const holders: pg.Client[] = [];
      for (let i = 0; i < 4; i++) {
        r.write(Buffer.concat([bindText('', 's1', [String(i)]), execute(''), SYNC]));
        const res = await r.readUntil('Z');
        assert.equal(types(res), '2DCZ');
        const [sum, pid] = dataRows(res)[0]!;
        assert.equal(sum, String(i + 1));
        pids.add(pid!);
        // Hold the backend just used in an open transaction so the next execution needs another one.
        const h = await pgClient();
        await h.query('BEGIN');
        await h.query('SELECT 1');
        holders.push(h);
      }
      if (mode === 'session') assert.equal(pids.size, 1, 'session mode keeps one backend');
      else assert.ok(pids.size > 1, `transaction mode should have moved between backends, saw ${[...pids].join(',')}`);
      // Describe the statement, Close it, then use it: PostgreSQL's answers, whatever the backend.
      r.write(Buffer.concat([writer(0x44).byte(0x53).cstring('s1').done(), SYNC]));
      assert.equal(types(await r.readUntil('Z')), 'tTZ');
      r.write(Buffer.concat([closeStatement('s1'), SYNC]));
      assert.equal(types(await r.readUntil('Z')), '3Z');
      r.write(Buffer.concat([bindText('', 's1', ['1']), execute(''), SYNC]));
      const gone = await r.readUntil('Z');
      assert.equal(types(gone), 'EZ');
      assert.equal(errorOf(gone[0]!).get('C'), '26000');
      for (const h of holders) await h.query('COMMIT');
      await Promise.all(holders.map((h) => h.end()));
      await bye(r);
    });

    /** Runs `work` against a proxy of its own, so a backend it wedges cannot spill into other tests. */
    const withOwnProxy = async (work: (q: TestProxy) => Promise<void>): Promise<void> => {
      const q = await startProxy({ mode });
      try {
        await work(q);
      } finally {
        for (const pool of q.proxy.ctx.pools.all()) for (const c of [...pool.busy]) c.destroy(null);
        await q.close();
      }
    };
    const pgVia = async (q: TestProxy): Promise<pg.Client> => {
      const c = new pg.Client({ ...q.clientConfig(USER, DB), connectionTimeoutMillis: 3000, query_timeout: 5000 });
      c.on('error', () => {});
      pgs.push(c);
      await c.connect();
      return c;
    };

    test('an unsynced extended-protocol error followed by a disconnect leaves no wedged backend', T, () =>
      withOwnProxy(async (q) => {
        const r = await RawClient.connect(q.port);
        raws.push(r);
        await r.login();
        // Bind to a statement that does not exist, then Flush: PostgreSQL errors and ignores everything until Sync.
        r.write(Buffer.concat([bindText('', 'no_such_statement', []), execute(''), writer(0x48).done()]));
        const err = await r.readMessage();
        assert.equal(err.type, 'E');
        assert.equal(errorOf(err).get('C'), '26000');
        r.destroy();
        // The clients that come next must get answers (pg gives up after 3 s to connect, 5 s per query).
        for (let i = 0; i < 3; i++) {
          const c = await pgVia(q);
          const res = await c.query<{ n: number }>('SELECT count(*)::int AS n FROM orders');
          assert.equal(res.rows[0]!.n, 3);
          await c.end();
        }
        await eventually(() => checkedOut(q) === 0, 3000, 'the backend of the client that left mid-error to be reset or closed');
      }));

    test('unsynced extended-protocol work is discarded when the client disconnects', T, () =>
      withOwnProxy(async (q) => {
        const r = await RawClient.connect(q.port);
        raws.push(r);
        await r.login();
        // Parse/Bind/Execute without Sync: an implicit transaction that PostgreSQL aborts when the client goes.
        r.write(Buffer.concat([parse('', `INSERT INTO ${table} VALUES (3, 'unsynced')`), bindText('', '', []), execute(''), writer(0x48).done()]));
        assert.equal(types([await r.readMessage(), await r.readMessage(), await r.readMessage()]), '12C');
        r.destroy();
        // The next clients use the pool (in transaction mode most likely that very backend).
        for (let i = 0; i < 3; i++) {
          const c = await pgVia(q);
          await c.query('SELECT 1');
          await c.end();
        }
        await sleep(200);
        const rows = await direct(`SELECT note FROM ${table} WHERE id = 3`, DB);
        await direct(`DELETE FROM ${table}`, DB);
        assert.deepEqual(rows, [], 'an INSERT whose client never sent Sync must not be committed');
      }));

    test('no backend stays checked out once every client has gone', T, async () => {
      await allReturned();
    });
  });
}
