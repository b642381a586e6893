// Operations, end to end with real clients: every admin route's JSON, metrics that move with traffic,
// the Prometheus exposition, admin_token, live reload from a file (POST /reload and SIGHUP through the CLI),
// pause/resume/disconnect, graceful shutdown through the CLI (SIGTERM), and the status page.
// The CLI tests run bin/heliosproxy.js, which needs dist/ (`npm run build`; `npm test` builds it).
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { loadConfigFile, primaryNode } from '../src/config/load.js';
import { ProxyServer, silentLogger } from '../src/server.js';
import { freePort, runPsql, testPg } from './helpers/pg.js';
import { direct, eventually, newclientTenantToml, REFERENCE_TOML, startProxy, type TestProxy } from './helpers/proxy.js';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const BIN = join(root, 'bin', 'heliosproxy.js');
const T = { timeout: 20_000 };

const tmp = mkdtempSync(join(tmpdir(), 'helios-admin-test-'));
const children: ChildProcess[] = [];
after(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  rmSync(tmp, { recursive: true, force: true });
});

// ── small helpers ────────────────────────────────────────────────────────────────────

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** `p`, or a rejection after `ms` (a stuck query or close must fail the test, not hang the run). */
async function within<V>(p: Promise<V>, ms: number, what: string): Promise<V> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** For after() hooks: waits at most `ms`, never throws. */
async function settle(p: Promise<unknown>, ms = 3000): Promise<void> {
  await within(p, ms, 'cleanup').catch(() => undefined);
}

function codeOf(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err) return String((err as { code: unknown }).code);
  return undefined;
}

/** null when `p` succeeds, else the error's SQLSTATE (or errno code). */
async function stateOf(p: Promise<unknown>): Promise<string | null> {
  try {
    await p;
    return null;
  } catch (err) {
    return codeOf(err) ?? String(err);
  }
}

/** The error `p` rejects with; fails when it succeeds. */
async function failure(p: Promise<unknown>): Promise<Error & { code?: string }> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof Error, String(err));
    return err as Error & { code?: string };
  }
  assert.fail('expected an error');
}

/** A TOML text edit that must apply (a drifting reference file must not turn a test into a no-op). */
function edit(text: string, from: string | RegExp, to: string): string {
  const out = text.replace(from, to);
  assert.notEqual(out, text, `TOML edit did not apply: ${String(from)}`);
  return out;
}

/** The reference proxy.toml pointed at the test cluster, listening on the given loopback ports. */
function fileConfig(listenPort: number, adminPort: number, top = ''): string {
  const db = testPg();
  let text = edit(REFERENCE_TOML, /^port\s*=\s*5432$/m, `port = ${db.port}`);
  text = text.replace(/^host\s*=\s*"127\.0\.0\.1"/m, `host = ${JSON.stringify(db.host)}`);
  text = edit(text, 'listen_address = "0.0.0.0:6432"', `listen_address = "127.0.0.1:${listenPort}"`);
  text = edit(text, 'admin_address  = "0.0.0.0:9090"', `admin_address  = "127.0.0.1:${adminPort}"`);
  return top + text;
}


/** `text` without the [[multi_tenancy.tenants]] block of tenant `id` (up to the next tenant block or the end). */
function withoutTenant(text: string, id: string): string {
  const at = text.indexOf(`id   = "${id}"`);
  assert.ok(at > 0, `no tenant ${id} in the file`);
  const start = text.lastIndexOf('[[multi_tenancy.tenants]]', at);
  const next = text.indexOf('[[multi_tenancy.tenants]]', at);
  return text.slice(0, start) + (next < 0 ? '' : text.slice(next));
}

// ── clients ──────────────────────────────────────────────────────────────────────────

interface Conn {
  client: pg.Client;
  /** 'error' events (a FATAL while idle arrives here, e.g. 57P01). */
  errors: (Error & { code?: string })[];
}

/** node-postgres clients of one suite, all closed (with a time guard) by closeAll(). */
class Clients {
  private readonly all: Conn[] = [];

  async open(cfg: pg.ClientConfig): Promise<Conn> {
    const client = new pg.Client(cfg);
    const conn: Conn = { client, errors: [] };
    client.on('error', (err: Error) => conn.errors.push(err));
    this.all.push(conn);
    await within(client.connect(), 10_000, `connect as ${cfg.user}`);
    return conn;
  }

  closeAll(): Promise<void> {
    return Promise.all(this.all.map((c) => settle(c.client.end(), 1500))).then(() => undefined);
  }
}

function clientConfig(port: number, user: string, database?: string): pg.ClientConfig {
  return { host: '127.0.0.1', port, user, password: 'apppass', ...(database !== undefined ? { database } : {}) };
}
const ACME = (port: number): pg.ClientConfig => clientConfig(port, 'acme.appuser', 'shared_db');
const WIDGETCO = (port: number): pg.ClientConfig => clientConfig(port, 'widgetco.appuser', 'widgetco_db');

/** The first column of the first row. */
async function scalar<V>(c: Conn, sql: string): Promise<V> {
  const r = await c.client.query<Record<string, V>>(sql);
  const row = r.rows[0];
  assert.ok(row !== undefined, `no row from ${sql}`);
  return Object.values(row)[0] as V;
}

/** Waits for a FATAL the proxy sends a session on its own and returns it. */
async function fatalOf(conn: Conn, ms = 3000, what = 'a FATAL on the session'): Promise<Error & { code?: string }> {
  await eventually(() => conn.errors.length > 0, ms, what);
  return conn.errors[0]!;
}

// ── HTTP ─────────────────────────────────────────────────────────────────────────────

interface HttpResult {
  status: number;
  type: string;
  text: string;
  headers: Headers;
}

async function http(port: number, path: string, opts: { method?: string; headers?: Record<string, string> } = {}): Promise<HttpResult> {
  const res = await within(fetch(`http://127.0.0.1:${port}${path}`, { method: opts.method ?? 'GET', headers: opts.headers ?? {} }), 5000, `${opts.method ?? 'GET'} ${path}`);
  return { status: res.status, type: res.headers.get('content-type') ?? '', text: await res.text(), headers: res.headers };
}

function json<V>(r: HttpResult): V {
  assert.match(r.type, /^application\/json/, `expected JSON, got ${r.type}: ${r.text.slice(0, 200)}`);
  return JSON.parse(r.text) as V;
}

async function getJson<V>(port: number, path: string, status = 200, headers: Record<string, string> = {}): Promise<V> {
  const r = await http(port, path, { headers });
  assert.equal(r.status, status, `GET ${path}: ${r.text}`);
  return json<V>(r);
}

async function post<V>(port: number, path: string, status = 200, headers: Record<string, string> = {}): Promise<V> {
  const r = await http(port, path, { method: 'POST', headers });
  assert.equal(r.status, status, `POST ${path}: ${r.text}`);
  return json<V>(r);
}

const REASONS = ['rate_limit', 'permission', 'isolation', 'connection_cap', 'duration', 'result_size', 'rows', 'too_long'] as const;
type Reason = (typeof REASONS)[number];

interface Latency {
  count: number;
  p50_ms: number | null;
  p95_ms: number | null;
  p99_ms: number | null;
}
interface Backends {
  active: number;
  idle: number;
  waiting: number;
}
interface TenantView {
  id: string;
  name: string;
  origin: string;
  paused: boolean;
  isolation: { strategy: string; database: string; schema: string | null };
  pool: { max_connections: number; min_idle: number | null; dedicated_pool: boolean };
  limits: {
    qps_limit: number | null;
    burst_capacity: number | null;
    max_connections: number | null;
    max_query_duration_secs: number | null;
    max_result_size: number | null;
    max_rows_per_query: number | null;
  };
  permissions: {
    allowed_operations: string[];
    read_only: boolean;
    allow_ddl: boolean;
    allow_explain: boolean;
    allow_system_access: boolean;
    max_tables_per_query?: number;
  } | null;
  live: { clients: number; backends_in_use: number; backends: Backends };
}
interface TenantMetrics {
  tenant: string;
  queries: number;
  errors: number;
  rejections: Record<Reason | 'total', number>;
  rows: number;
  bytes: number;
  qps: number;
  bucket_level: number | null;
  latency: Latency;
  clients: number;
  backends_in_use: number;
  pool: Backends;
}
interface GlobalMetrics {
  uptime_secs: number;
  tenants: number;
  clients: number;
  queries: number;
  errors: number;
  rejections: Record<Reason | 'total', number>;
  rows: number;
  bytes: number;
  qps: number;
  latency: Latency;
  backends: Backends & { connecting: number };
  memory: { rss_bytes: number; heap_used_bytes: number };
  socket_layer: { mode: 'native' | 'node'; native_sockets: number };
}
interface PoolStats {
  name: string;
  database: string;
  role: string;
  idle: number;
  active: number;
  connecting: number;
  waiting: number;
  max: number;
}
interface ReloadOk {
  ok: true;
  added: string[];
  removed: string[];
  reconfigured: string[];
  restartRequired: string[];
  notEnforced: string[];
}
interface ErrorBody {
  error: { message: string; problems?: string[] };
}
interface ActionBody {
  tenant: string;
  action: string;
  paused: boolean;
}

const tenantMetrics = (port: number, id: string): Promise<TenantMetrics> => getJson<TenantMetrics>(port, `/tenants/${id}/metrics`);
const globalMetrics = (port: number): Promise<GlobalMetrics> => getJson<GlobalMetrics>(port, '/metrics');

function isCount(v: unknown): boolean {
  return typeof v === 'number' && Number.isInteger(v) && v >= 0;
}
function assertCounts(o: object, keys: string[], where: string): void {
  for (const k of keys) assert.ok(isCount((o as Record<string, unknown>)[k]), `${where}.${k} should be a non-negative integer, got ${JSON.stringify((o as Record<string, unknown>)[k])}`);
}
function assertLatency(l: Latency, where: string): void {
  assert.deepEqual(Object.keys(l).sort(), ['count', 'p50_ms', 'p95_ms', 'p99_ms'], where);
  assert.ok(isCount(l.count), `${where}.count`);
  for (const q of [l.p50_ms, l.p95_ms, l.p99_ms]) assert.ok(q === null || (typeof q === 'number' && q >= 0), `${where} quantile ${String(q)}`);
  if (l.count > 0) {
    assert.ok(l.p50_ms !== null && l.p95_ms !== null && l.p99_ms !== null, `${where}: quantiles once something was measured`);
    assert.ok(l.p50_ms <= l.p95_ms && l.p95_ms <= l.p99_ms, `${where}: p50 ≤ p95 ≤ p99 (${l.p50_ms}, ${l.p95_ms}, ${l.p99_ms})`);
  } else assert.deepEqual([l.p50_ms, l.p95_ms, l.p99_ms], [null, null, null], `${where}: no quantiles before any statement`);
}
function assertRejections(r: Record<string, number>, where: string): void {
  assert.deepEqual(Object.keys(r).sort(), [...REASONS, 'total'].sort(), `${where}: one counter per reason plus total`);
  assertCounts(r, [...REASONS, 'total'], where);
  assert.equal(r.total, REASONS.reduce((n, k) => n + r[k]!, 0), `${where}.total is the sum of the reasons`);
}
function assertBackends(b: Backends, where: string): void {
  assertCounts(b, ['active', 'idle', 'waiting'], where);
}

// ── Prometheus text exposition ───────────────────────────────────────────────────────

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}
interface Exposition {
  help: Map<string, string>;
  type: Map<string, string>;
  samples: Sample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
// Prometheus parses values with Go's strconv.ParseFloat: NaN and Inf in any case (prom-client writes "Nan").
const PROM_NUMBER = /^(?:[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf(?:inity)?|nan)$/i;

function parseLabels(s: string, line: string): Record<string, string> {
  const out: Record<string, string> = {};
  const re = /\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"\s*(,|$)/y;
  let at = 0;
  while (at < s.length) {
    re.lastIndex = at;
    const m = re.exec(s);
    assert.ok(m !== null, `bad label set at ${at} in: ${line}`);
    assert.ok(!(m[1]! in out), `duplicate label ${m[1]} in: ${line}`);
    out[m[1]!] = m[2]!.replace(/\\n/g, '\n').replace(/\\"/g, '"').replace(/\\\\/g, '\\');
    at = re.lastIndex;
    if (m[3] === '') break;
  }
  return out;
}

function parseExposition(text: string): Exposition {
  const exp: Exposition = { help: new Map(), type: new Map(), samples: [] };
  assert.ok(text.endsWith('\n'), 'the exposition ends with a newline');
  for (const line of text.split('\n')) {
    if (line === '') continue;
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+) ?(.*)$/.exec(line);
      assert.ok(m !== null, `comment line is neither # HELP nor # TYPE: ${line}`);
      assert.match(m[2]!, METRIC_NAME, line);
      if (m[1] === 'HELP') {
        assert.ok(!exp.help.has(m[2]!), `second HELP for ${m[2]}`);
        exp.help.set(m[2]!, m[3]!);
      } else {
        assert.ok(['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(m[3]!), `TYPE ${m[3]} in: ${line}`);
        assert.ok(!exp.type.has(m[2]!), `second TYPE for ${m[2]}`);
        exp.type.set(m[2]!, m[3]!);
      }
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: (-?\d+))?$/.exec(line);
    assert.ok(m !== null, `not a sample line: ${line}`);
    assert.match(m[3]!, PROM_NUMBER, `value is not a number: ${line}`);
    const v = m[3]!.toLowerCase();
    const value = v === 'nan' ? NaN : /inf/.test(v) ? (v.startsWith('-') ? -Infinity : Infinity) : Number(v);
    exp.samples.push({ name: m[1]!, labels: m[2] === undefined || m[2] === '' ? {} : parseLabels(m[2], line), value });
  }
  // Every sample belongs to a family with a TYPE and a HELP.
  for (const s of exp.samples) {
    const family = exp.type.has(s.name) ? s.name : s.name.replace(/_(bucket|sum|count)$/, '');
    assert.ok(exp.type.has(family), `no # TYPE for ${s.name}`);
    assert.ok(exp.help.has(family), `no # HELP for ${s.name}`);
    if (s.name.endsWith('_bucket') && exp.type.get(family) === 'histogram') assert.ok('le' in s.labels, `bucket without le: ${s.name}`);
  }
  return exp;
}

function samples(exp: Exposition, name: string, labels: Record<string, string> = {}): Sample[] {
  return exp.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
}

/** The one sample with exactly these labels. */
function one(exp: Exposition, name: string, labels: Record<string, string>): number {
  const found = samples(exp, name, labels).filter((s) => Object.keys(s.labels).length === Object.keys(labels).length);
  assert.equal(found.length, 1, `${name}${JSON.stringify(labels)}: ${found.length} samples`);
  return found[0]!.value;
}

async function scrape(port: number, path = '/metrics/prometheus', headers: Record<string, string> = {}): Promise<Exposition> {
  const r = await http(port, path, { headers });
  assert.equal(r.status, 200, r.text);
  assert.match(r.type, /^text\/plain; version=0\.0\.4/, `content-type ${r.type}`);
  return parseExposition(r.text);
}

/** A histogram's buckets for one label set: cumulative, non-decreasing, +Inf equal to _count. Returns _count. */
function assertHistogram(exp: Exposition, name: string, labels: Record<string, string>): number {
  const buckets = samples(exp, `${name}_bucket`, labels).map((s) => ({ le: s.labels.le === '+Inf' ? Infinity : Number(s.labels.le), value: s.value }));
  assert.ok(buckets.length > 1, `${name}${JSON.stringify(labels)} has buckets`);
  for (const b of buckets) assert.ok(!Number.isNaN(b.le), `le is a number`);
  const sorted = [...buckets].sort((a, b) => a.le - b.le);
  assert.deepEqual(buckets.map((b) => b.le), sorted.map((b) => b.le), 'buckets are listed in ascending le');
  assert.equal(new Set(sorted.map((b) => b.le)).size, sorted.length, 'no le twice');
  for (let i = 1; i < sorted.length; i++) assert.ok(sorted[i]!.value >= sorted[i - 1]!.value, `bucket le=${sorted[i]!.le} (${sorted[i]!.value}) < le=${sorted[i - 1]!.le} (${sorted[i - 1]!.value})`);
  const inf = sorted[sorted.length - 1]!;
  assert.equal(inf.le, Infinity, 'the last bucket is +Inf');
  const count = one(exp, `${name}_count`, labels);
  assert.equal(inf.value, count, '+Inf bucket equals _count');
  const sum = one(exp, `${name}_sum`, labels);
  assert.ok(sum >= 0 && (count > 0 || sum === 0), `_sum ${sum}`);
  return count;
}

// ── the CLI ──────────────────────────────────────────────────────────────────────────

interface CliProxy {
  child: ChildProcess;
  output(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

async function spawnCli(file: string): Promise<CliProxy> {
  assert.ok(existsSync(join(root, 'dist', 'cli', 'main.js')), 'dist/ is missing: run `npm run build` first');
  const child = spawn(process.execPath, [BIN, '--config', file], { cwd: tmp, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('close', (code, signal) => resolve({ code, signal })));
  await eventually(() => out.includes('heliosproxy listening') || child.exitCode !== null, 10_000, 'the CLI proxy to listen');
  assert.ok(out.includes('heliosproxy listening'), `the proxy did not start:\n${out}`);
  return { child, output: () => out, exited };
}

async function stopCli(h: CliProxy | undefined): Promise<void> {
  if (h === undefined || h.child.exitCode !== null || h.child.signalCode !== null) return;
  h.child.kill('SIGTERM');
  try {
    await within(h.exited, 5000, 'CLI exit');
  } catch {
    h.child.kill('SIGKILL');
  }
}

// ══ 1–3: routes, metrics, Prometheus ═════════════════════════════════════════════════

describe('admin API routes, metrics and Prometheus (in-process proxy, admin on)', () => {
  let p: TestProxy;
  let admin: number;
  const clients = new Clients();
  before(async () => {
    p = await startProxy({ admin: true });
    admin = p.adminPort!;
  });
  after(async () => {
    await clients.closeAll();
    await settle(p.close(), 5000);
  });

  describe('route shapes', () => {
    test('GET /health: 200 {status: "ok", uptime_secs}', async () => {
      const body = await getJson<{ status: string; uptime_secs: number }>(admin, '/health');
      assert.equal(body.status, 'ok');
      assert.ok(isCount(body.uptime_secs));
    });

    test('GET /ready: 200 {status: "ready"} with the test cluster up', async () => {
      const body = await getJson<{ status: string }>(admin, '/ready');
      assert.deepEqual(body, { status: 'ready' });
    });

    test('GET /ready: 503 with an error when the primary is unreachable (second proxy on a closed port)', T, async () => {
      const closed = await freePort();
      const dead = await startProxy({ admin: true, patch: (c) => void (primaryNode(c).port = closed) });
      try {
        const r = await http(dead.adminPort!, '/ready');
        assert.equal(r.status, 503, r.text);
        const body = json<{ status: string; error: string }>(r);
        assert.equal(body.status, 'not ready');
        assert.equal(typeof body.error, 'string');
        assert.match(body.error, new RegExp(`:${closed}\\b`), 'the error names the primary it could not reach');
        // Liveness does not depend on the backend.
        assert.equal((await http(dead.adminPort!, '/health')).status, 200);
      } finally {
        await settle(dead.close(), 5000);
      }
    });

    test('GET /tenants: both tenants with id, name, isolation, pool, limits, permissions, live', async () => {
      // One client per tenant so live figures and pools exist.
      const a = await clients.open(ACME(p.port));
      await a.client.query('SELECT 1');
      const w = await clients.open(WIDGETCO(p.port));
      await w.client.query('SELECT 1');
      const { tenants } = await getJson<{ tenants: TenantView[] }>(admin, '/tenants');
      assert.deepEqual(tenants.map((t) => t.id).sort(), ['acme', 'widgetco']);
      const acme = tenants.find((t) => t.id === 'acme')!;
      const widgetco = tenants.find((t) => t.id === 'widgetco')!;
      for (const t of tenants) {
        assert.deepEqual(Object.keys(t).sort(), ['id', 'isolation', 'limits', 'live', 'name', 'origin', 'paused', 'permissions', 'pool'].sort(), t.id);
        assert.equal(t.origin, 'configured');
        assert.equal(t.paused, false);
        assertCounts(t.live, ['clients', 'backends_in_use'], `${t.id}.live`);
        assertBackends(t.live.backends, `${t.id}.live.backends`);
        assert.ok(t.live.clients >= 1, `${t.id} has a client`);
      }
      assert.equal(acme.name, 'Acme Corp');
      assert.deepEqual(acme.isolation, { strategy: 'schema', database: 'shared_db', schema: 'acme' });
      assert.deepEqual(acme.pool, { max_connections: 50, min_idle: 2, dedicated_pool: false });
      assert.deepEqual(acme.limits, { qps_limit: 1000, burst_capacity: 2000, max_connections: 50, max_query_duration_secs: 60, max_result_size: 104857600, max_rows_per_query: 100000 });
      assert.deepEqual(acme.permissions, { allowed_operations: ['SELECT', 'INSERT', 'UPDATE', 'DELETE'], read_only: false, allow_ddl: true, allow_explain: true, allow_system_access: false, max_tables_per_query: 10 });
      assert.equal(widgetco.name, 'WidgetCo');
      assert.deepEqual(widgetco.isolation, { strategy: 'database', database: 'widgetco_db', schema: null });
      assert.deepEqual(widgetco.pool, { max_connections: 20, min_idle: 1, dedicated_pool: true });
      assert.deepEqual(widgetco.limits, { qps_limit: 200, burst_capacity: 300, max_connections: 20, max_query_duration_secs: 30, max_result_size: 52428800, max_rows_per_query: 50000 });
      assert.equal(widgetco.permissions?.allow_ddl, false);
      assert.equal(widgetco.permissions?.max_tables_per_query, 5);
      // Idle in transaction mode: the client holds no backend, the pool has it idle.
      assert.equal(acme.live.backends_in_use, 0);
      assert.ok(widgetco.live.backends.idle >= 1, 'widgetco\'s dedicated pool keeps its backend idle');
    });

    test('GET /tenants/acme: the same view as in the list', async () => {
      const one = await getJson<TenantView>(admin, '/tenants/acme');
      const { tenants } = await getJson<{ tenants: TenantView[] }>(admin, '/tenants');
      assert.deepEqual(one, tenants.find((t) => t.id === 'acme'));
      // A trailing slash names the same resource.
      assert.deepEqual(await getJson<TenantView>(admin, '/tenants/acme/'), one);
    });

    test('GET /tenants/acme/metrics: counters, rejections by reason + total, qps, bucket, latency, live', async () => {
      const m = await tenantMetrics(admin, 'acme');
      assert.deepEqual(Object.keys(m).sort(), ['backends_in_use', 'bucket_level', 'bytes', 'clients', 'errors', 'http', 'latency', 'pool', 'qps', 'queries', 'rejections', 'rows', 'tenant'].sort());
      assert.equal(m.tenant, 'acme');
      assertCounts(m, ['queries', 'errors', 'rows', 'bytes', 'clients', 'backends_in_use'], 'acme metrics');
      assert.ok(m.queries >= 1 && m.rows >= 1 && m.bytes > 0, 'the SELECT 1 above counted');
      assertRejections(m.rejections, 'acme.rejections');
      assert.equal(typeof m.qps, 'number');
      assert.ok(m.qps >= 0);
      assert.ok(typeof m.bucket_level === 'number' && m.bucket_level >= 0 && m.bucket_level <= 2000, `bucket_level ${m.bucket_level}`);
      assertLatency(m.latency, 'acme.latency');
      assert.ok(m.latency.count >= 1);
      assertBackends(m.pool, 'acme.pool');
      assert.ok(m.clients >= 1);
    });

    test('unknown tenant: 404 with a JSON error, for the view, its metrics and its actions', async () => {
      for (const path of ['/tenants/nobody', '/tenants/nobody/metrics']) {
        const body = await getJson<ErrorBody>(admin, path, 404);
        assert.match(body.error.message, /unknown tenant "nobody"/);
      }
      const body = await post<ErrorBody>(admin, '/tenants/nobody/pause', 404);
      assert.match(body.error.message, /unknown tenant "nobody"/);
    });

    test('GET /pools: every pool with name, database, role, idle, active, connecting, waiting, max', async () => {
      const { pools } = await getJson<{ pools: PoolStats[] }>(admin, '/pools');
      const names = pools.map((x) => x.name).sort();
      assert.ok(names.includes('shared/shared_db/appuser'), names.join(', '));
      assert.ok(names.includes('widgetco/widgetco_db/appuser'), names.join(', '));
      for (const pool of pools) {
        assert.deepEqual(Object.keys(pool).sort(), ['active', 'connecting', 'database', 'idle', 'max', 'name', 'role', 'waiting']);
        assert.equal(pool.role, 'appuser');
        assertCounts(pool, ['idle', 'active', 'connecting', 'waiting', 'max'], pool.name);
        assert.ok(pool.max >= 1);
      }
      assert.equal(pools.find((x) => x.name.startsWith('widgetco/'))!.database, 'widgetco_db');
    });

    test('GET /metrics: global JSON (uptime, tenants, clients, counters, rejections, qps, latency, backends, memory)', async () => {
      const g = await globalMetrics(admin);
      assert.deepEqual(Object.keys(g).sort(), ['backends', 'bytes', 'clients', 'errors', 'http', 'latency', 'memory', 'qps', 'queries', 'rejections', 'rows', 'socket_layer', 'tenants', 'uptime_secs'].sort());
      assert.ok(['native', 'node'].includes(g.socket_layer.mode));
      assert.ok(g.socket_layer.mode === 'native' ? g.socket_layer.native_sockets > 0 : g.socket_layer.native_sockets === 0);
      assertCounts(g, ['uptime_secs', 'tenants', 'clients', 'queries', 'errors', 'rows', 'bytes'], 'global');
      assert.equal(g.tenants, 2);
      assert.ok(g.clients >= 2);
      assertRejections(g.rejections, 'global.rejections');
      assert.equal(typeof g.qps, 'number');
      assertLatency(g.latency, 'global.latency');
      assertCounts(g.backends, ['active', 'idle', 'connecting', 'waiting'], 'global.backends');
      assert.ok(g.memory.rss_bytes > 0 && g.memory.heap_used_bytes > 0 && g.memory.heap_used_bytes < g.memory.rss_bytes * 4);
      // The global counters are the tenants' summed (no passthrough here).
      const [a, w] = [await tenantMetrics(admin, 'acme'), await tenantMetrics(admin, 'widgetco')];
      assert.equal(g.queries, a.queries + w.queries);
      assert.equal(g.rows, a.rows + w.rows);
      assert.equal(g.latency.count, a.latency.count + w.latency.count);
    });

    test('unknown route: 404; a known route with the wrong method: 405', async () => {
      for (const path of ['/nope', '/tenant', '/metrics/json', '/pools/x']) {
        const r = await http(admin, path);
        assert.equal(r.status, 404, `${path}: ${r.text}`);
        assert.match(json<ErrorBody>(r).error.message, /no route/);
      }
      const wrong: [string, string][] = [
        ['POST', '/tenants'],
        ['POST', '/pools'],
        ['DELETE', '/tenants/acme'],
        ['PUT', '/metrics'],
        ['GET', '/reload'],
        ['GET', '/tenants/acme/pause'],
        ['POST', '/metrics/prometheus'],
      ];
      for (const [method, path] of wrong) {
        const r = await http(admin, path, { method });
        assert.equal(r.status, 405, `${method} ${path}: ${r.text}`);
        assert.match(json<ErrorBody>(r).error.message, /not allowed/);
      }
      // Nothing of that changed state.
      assert.equal((await getJson<TenantView>(admin, '/tenants/acme')).paused, false);
    });
  });

  describe('metrics move with traffic', () => {
    let acme: Conn;
    let widgetco: Conn;
    before(async () => {
      acme = await clients.open(ACME(p.port));
      widgetco = await clients.open(WIDGETCO(p.port));
    });

    test('acme statements: queries, rows, bytes and latency.count increase by exactly what ran', async () => {
      const [m0, g0] = [await tenantMetrics(admin, 'acme'), await globalMetrics(admin)];
      for (let i = 0; i < 5; i++) {
        const r = await acme.client.query<{ customer: string }>('SELECT customer FROM orders ORDER BY id');
        assert.equal(r.rowCount, 3);
      }
      const [m1, g1] = [await tenantMetrics(admin, 'acme'), await globalMetrics(admin)];
      assert.equal(m1.queries - m0.queries, 5);
      assert.equal(m1.rows - m0.rows, 15);
      assert.ok(m1.bytes - m0.bytes >= 15 * 'acme-customer-1'.length, `bytes +${m1.bytes - m0.bytes}`);
      assert.equal(m1.latency.count - m0.latency.count, 5);
      assertLatency(m1.latency, 'acme.latency');
      assert.equal(m1.errors, m0.errors);
      assert.equal(m1.rejections.total, m0.rejections.total);
      assert.equal(g1.queries - g0.queries, 5);
      assert.equal(g1.rows - g0.rows, 15);
      assert.equal(g1.latency.count - g0.latency.count, 5);
    });

    test('acme reading newclient.orders is refused (42501) and counted as isolation', async () => {
      const [m0, w0] = [await tenantMetrics(admin, 'acme'), await tenantMetrics(admin, 'widgetco')];
      const err = await failure(acme.client.query('SELECT * FROM newclient.orders'));
      assert.equal(err.code, '42501');
      assert.match(err.message, /tenant "acme".*schema "newclient"/);
      const [m1, w1] = [await tenantMetrics(admin, 'acme'), await tenantMetrics(admin, 'widgetco')];
      assert.equal(m1.rejections.isolation - m0.rejections.isolation, 1);
      assert.equal(m1.rejections.total - m0.rejections.total, 1);
      assert.equal(m1.rejections.permission, m0.rejections.permission);
      assert.equal(m1.queries, m0.queries, 'a refused statement never reached the backend');
      assert.deepEqual(w1.rejections, w0.rejections, 'widgetco is untouched');
      // The session goes on.
      assert.equal(await scalar<number>(acme, 'SELECT count(*)::int AS n FROM orders'), 3);
    });

    test('widgetco CREATE TABLE is refused (42501) and counted as permission', async () => {
      const [w0, a0, g0] = [await tenantMetrics(admin, 'widgetco'), await tenantMetrics(admin, 'acme'), await globalMetrics(admin)];
      const err = await failure(widgetco.client.query('CREATE TABLE admin_test_never (id int)'));
      assert.equal(err.code, '42501');
      const [w1, a1, g1] = [await tenantMetrics(admin, 'widgetco'), await tenantMetrics(admin, 'acme'), await globalMetrics(admin)];
      assert.equal(w1.rejections.permission - w0.rejections.permission, 1);
      assert.equal(w1.rejections.total - w0.rejections.total, 1);
      assert.equal(a1.rejections.permission, a0.rejections.permission);
      assert.equal(g1.rejections.permission - g0.rejections.permission, 1);
      assert.equal(g1.rejections.total - g0.rejections.total, 1);
      const exists = await direct<{ t: string | null }>("SELECT to_regclass('public.admin_test_never')::text AS t", 'widgetco_db');
      assert.equal(exists[0]!.t, null, 'nothing was created');
    });

    test('a backend error (SELECT 1/0) counts in errors, not in rejections', async () => {
      const m0 = await tenantMetrics(admin, 'acme');
      const err = await failure(acme.client.query('SELECT 1/0'));
      assert.equal(err.code, '22012');
      // node-postgres rejects at the ErrorResponse; the request's latency is recorded at the ReadyForQuery after it.
      let m1 = await tenantMetrics(admin, 'acme');
      await eventually(async () => (m1 = await tenantMetrics(admin, 'acme')).latency.count > m0.latency.count, 2000, 'the latency sample');
      assert.equal(m1.errors - m0.errors, 1);
      assert.equal(m1.queries - m0.queries, 1);
      assert.equal(m1.latency.count - m0.latency.count, 1);
      assert.equal(m1.rejections.total, m0.rejections.total);
    });

    test('qps becomes > 0 while a loop runs and falls back to 0 after it stops', T, async () => {
      let stop = false;
      let ran = 0;
      const loop = (async () => {
        while (!stop) {
          await acme.client.query('SELECT 1');
          ran++;
          await sleep(5);
        }
      })();
      try {
        await eventually(async () => (await tenantMetrics(admin, 'acme')).qps > 0, 5000, 'acme qps > 0');
        await eventually(async () => (await globalMetrics(admin)).qps > 0, 3000, 'global qps > 0');
        const exp = await scrape(admin);
        assert.ok(one(exp, 'heliosproxy_tenant_qps', { tenant: 'acme' }) > 0);
      } finally {
        stop = true;
        await loop;
      }
      assert.ok(ran > 10);
      await eventually(async () => (await tenantMetrics(admin, 'acme')).qps === 0, 4000, 'acme qps back to 0');
    });
  });

  describe('Prometheus exposition', () => {
    test('GET /metrics/prometheus and GET /metrics with Accept: text/plain: the same families, well formed', async () => {
      const a = await scrape(admin);
      const b = await scrape(admin, '/metrics', { accept: 'text/plain' });
      assert.deepEqual([...b.type.keys()].sort(), [...a.type.keys()].sort());
      // OpenMetrics' Accept gets the text format too; explicit JSON wins.
      await scrape(admin, '/metrics', { accept: 'application/openmetrics-text; version=1.0.0' });
      const j = await http(admin, '/metrics', { headers: { accept: 'application/json, text/plain' } });
      json<GlobalMetrics>(j);
    });

    test('per-tenant counters match the JSON; rejections by tenant and reason', async () => {
      const exp = await scrape(admin);
      const [a, w] = [await tenantMetrics(admin, 'acme'), await tenantMetrics(admin, 'widgetco')];
      assert.equal(exp.type.get('heliosproxy_queries_total'), 'counter');
      assert.equal(one(exp, 'heliosproxy_queries_total', { tenant: 'acme' }), a.queries);
      assert.equal(one(exp, 'heliosproxy_queries_total', { tenant: 'widgetco' }), w.queries);
      assert.equal(one(exp, 'heliosproxy_errors_total', { tenant: 'acme' }), a.errors);
      assert.equal(one(exp, 'heliosproxy_rows_total', { tenant: 'acme' }), a.rows);
      assert.equal(one(exp, 'heliosproxy_result_bytes_total', { tenant: 'acme' }), a.bytes);
      for (const [t, m] of [['acme', a], ['widgetco', w]] as const) {
        for (const reason of REASONS) assert.equal(one(exp, 'heliosproxy_rejections_total', { tenant: t, reason }), m.rejections[reason], `${t}/${reason}`);
      }
      assert.ok(one(exp, 'heliosproxy_rejections_total', { tenant: 'acme', reason: 'isolation' }) >= 1);
      assert.ok(one(exp, 'heliosproxy_rejections_total', { tenant: 'widgetco', reason: 'permission' }) >= 1);
      assert.equal(one(exp, 'heliosproxy_tenant_clients', { tenant: 'acme' }), a.clients);
      assert.equal(one(exp, 'heliosproxy_clients', {}), (await globalMetrics(admin)).clients);
    });

    test('latency histogram: cumulative, non-decreasing buckets, +Inf equal to _count, _count equal to the JSON', async () => {
      const exp = await scrape(admin);
      assert.equal(exp.type.get('heliosproxy_query_duration_seconds'), 'histogram');
      const acmeCount = assertHistogram(exp, 'heliosproxy_query_duration_seconds', { tenant: 'acme' });
      assert.equal(acmeCount, (await tenantMetrics(admin, 'acme')).latency.count);
      assert.ok(acmeCount >= 5);
      assertHistogram(exp, 'heliosproxy_query_duration_seconds', { tenant: 'widgetco' });
    });

    test('pool gauges, process metrics, and tenant labels only for configured tenants', async () => {
      const exp = await scrape(admin);
      const pools = samples(exp, 'heliosproxy_pool_connections');
      assert.ok(pools.length > 0);
      for (const s of pools) {
        assert.deepEqual(Object.keys(s.labels).sort(), ['pool', 'state']);
        assert.ok(['active', 'idle', 'connecting', 'waiting'].includes(s.labels.state!), s.labels.state);
        assert.ok(Number.isInteger(s.value) && s.value >= 0);
      }
      const { pools: json } = await getJson<{ pools: PoolStats[] }>(admin, '/pools');
      assert.deepEqual([...new Set(pools.map((s) => s.labels.pool))].sort(), json.map((x) => x.name).sort());
      const families = [...exp.type.keys()];
      assert.ok(families.some((f) => /^heliosproxy_process_.*cpu.*seconds_total$/.test(f)), 'process CPU');
      assert.ok(families.some((f) => /^heliosproxy_process_.*resident_memory_bytes$/.test(f)), 'process RSS');
      assert.ok(families.some((f) => /^heliosproxy_nodejs_heap_size_used_bytes$/.test(f)), 'heap');
      const tenantLabels = new Set(exp.samples.filter((s) => 'tenant' in s.labels).map((s) => s.labels.tenant));
      assert.deepEqual([...tenantLabels].sort(), ['acme', 'widgetco']);
    });
  });

  describe('status page', () => {
    test('GET /: HTML naming HeliosProxy', async () => {
      const r = await http(admin, '/');
      assert.equal(r.status, 200);
      assert.match(r.type, /^text\/html/);
      assert.match(r.text, /HeliosProxy/);
      assert.match(r.text, /<table/);
    });

    test('rendered in headless Chromium: a table row for acme', { timeout: 30_000 }, async (t) => {
      const chromium = '/usr/bin/chromium';
      if (!existsSync(chromium)) {
        t.skip('no /usr/bin/chromium');
        return;
      }
      const profile = mkdtempSync(join(tmp, 'chromium-'));
      const args = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', `--user-data-dir=${profile}`, '--virtual-time-budget=3000', '--dump-dom', `http://127.0.0.1:${admin}/`];
      const child = spawn(chromium, args, { stdio: ['ignore', 'pipe', 'pipe'] });
      children.push(child);
      let dom = '';
      child.stdout!.setEncoding('utf8').on('data', (d: string) => (dom += d));
      const code = await within(new Promise<number | null>((resolve) => child.on('close', resolve)), 25_000, 'chromium --dump-dom');
      assert.equal(code, 0);
      assert.match(dom, /<tr><td>acme<\/td><td>shared_db\.acme<\/td>/);
      assert.match(dom, /<tr><td>widgetco<\/td>/);
    });
  });
});

// ══ 2: the rate limit ════════════════════════════════════════════════════════════════

describe('rate_limit rejections (acme qps_limit = 2, burst 1.0)', () => {
  let p: TestProxy;
  const clients = new Clients();
  before(async () => {
    p = await startProxy({
      admin: true,
      patch: (c) => {
        const rl = c.multi_tenancy.tenants.find((t) => t.id === 'acme')!.rate_limits!;
        rl.qps_limit = 2;
        rl.burst_multiplier = 1;
      },
    });
  });
  after(async () => {
    await clients.closeAll();
    await settle(p.close(), 5000);
  });

  test('statements over the bucket get 53400 and count as rate_limit, in JSON and Prometheus', async () => {
    const admin = p.adminPort!;
    const c = await clients.open(ACME(p.port));
    const m0 = await tenantMetrics(admin, 'acme');
    const codes: (string | null)[] = [];
    let message = '';
    for (let i = 0; i < 8; i++) {
      try {
        await c.client.query('SELECT 1');
        codes.push(null);
      } catch (err) {
        codes.push(codeOf(err) ?? String(err));
        message = err instanceof Error ? err.message : String(err);
      }
    }
    const refused = codes.filter((x) => x === '53400').length;
    assert.deepEqual(codes.filter((x) => x !== null && x !== '53400'), [], 'only rate-limit errors');
    assert.ok(refused >= 4, `refused ${refused} of 8: ${JSON.stringify(codes)}`);
    assert.match(message, /rate limit exceeded for tenant "acme"/);
    const m1 = await tenantMetrics(admin, 'acme');
    assert.equal(m1.rejections.rate_limit - m0.rejections.rate_limit, refused);
    assert.equal(m1.rejections.total - m0.rejections.total, refused);
    assert.equal(m1.queries - m0.queries, 8 - refused, 'only the statements let through count as queries');
    assert.ok(m1.bucket_level !== null && m1.bucket_level <= 2);
    const exp = await scrape(admin);
    assert.equal(one(exp, 'heliosproxy_rejections_total', { tenant: 'acme', reason: 'rate_limit' }), m1.rejections.rate_limit);
    assert.equal(one(exp, 'heliosproxy_rejections_total', { tenant: 'widgetco', reason: 'rate_limit' }), 0);
    assert.equal((await globalMetrics(admin)).rejections.rate_limit, m1.rejections.rate_limit);
    const tokens = one(exp, 'heliosproxy_tenant_bucket_tokens', { tenant: 'acme' });
    assert.ok(tokens >= 0 && tokens <= 2, `bucket tokens ${tokens}`);
  });
});

// ══ 3: "(unknown)" only with passthrough ═════════════════════════════════════════════

describe('metrics of unidentified connections (allow_unknown_tenants = true)', () => {
  let p: TestProxy;
  const clients = new Clients();
  before(async () => {
    p = await startProxy({ admin: true, patch: (c) => void (c.multi_tenancy.allow_unknown_tenants = true) });
  });
  after(async () => {
    await clients.closeAll();
    await settle(p.close(), 5000);
  });

  test('no "(unknown)" label until a passthrough connection is used; then it appears', async () => {
    const admin = p.adminPort!;
    const a = await clients.open(ACME(p.port));
    await a.client.query('SELECT 1');
    const before = await scrape(admin);
    assert.deepEqual([...new Set(before.samples.filter((s) => 'tenant' in s.labels).map((s) => s.labels.tenant))].sort(), ['acme', 'widgetco']);
    const u = await clients.open(clientConfig(p.port, 'appuser', 'shared_db'));
    assert.equal(await scalar<string>(u, 'SELECT current_user AS u'), 'appuser');
    const exp = await scrape(admin);
    assert.deepEqual([...new Set(exp.samples.filter((s) => 'tenant' in s.labels).map((s) => s.labels.tenant))].sort(), ['(unknown)', 'acme', 'widgetco']);
    assert.equal(one(exp, 'heliosproxy_queries_total', { tenant: '(unknown)' }), 1);
    // /tenants lists configured tenants only; the global JSON counts everyone.
    const { tenants } = await getJson<{ tenants: TenantView[] }>(admin, '/tenants');
    assert.deepEqual(tenants.map((t) => t.id).sort(), ['acme', 'widgetco']);
    const g = await globalMetrics(admin);
    assert.equal(g.tenants, 2);
    assert.equal(g.queries, (await tenantMetrics(admin, 'acme')).queries + 1);
  });

  test('two unidentified databases: the "(unknown)" series add up (clients, queries)', async () => {
    const admin = p.adminPort!;
    const w = await clients.open(clientConfig(p.port, 'appuser', 'widgetco_db'));
    assert.equal(await scalar<string>(w, 'SELECT current_database() AS d'), 'widgetco_db');
    const exp = await scrape(admin);
    const g = await globalMetrics(admin);
    assert.equal(g.clients, 3, 'acme + two unidentified clients');
    assert.equal(one(exp, 'heliosproxy_queries_total', { tenant: '(unknown)' }), 2, 'counters of both passthrough databases are summed');
    assert.equal(one(exp, 'heliosproxy_query_duration_seconds_count', { tenant: '(unknown)' }), 2);
    assert.equal(one(exp, 'heliosproxy_tenant_clients', { tenant: '(unknown)' }), 2, 'both unidentified clients are counted under "(unknown)"');
  });
});

// ══ 4: admin_token ═══════════════════════════════════════════════════════════════════

describe('admin_token', () => {
  const TOKEN = 'test-admin-token-0123456789abcdef';
  let p: TestProxy;
  before(async () => {
    p = await startProxy({ admin: true, patch: (c) => void (c.admin_token = TOKEN) });
  });
  after(() => settle(p.close(), 5000));

  test('without a token: 401 with WWW-Authenticate: Bearer on every route but /health and /ready', async () => {
    const admin = p.adminPort!;
    for (const path of ['/tenants', '/tenants/acme', '/tenants/acme/metrics', '/pools', '/metrics', '/metrics/prometheus', '/']) {
      const r = await http(admin, path);
      assert.equal(r.status, 401, `${path}: ${r.text}`);
      assert.equal(r.headers.get('www-authenticate'), 'Bearer');
      assert.match(json<ErrorBody>(r).error.message, /admin token/);
    }
    for (const path of ['/reload', '/tenants/acme/pause', '/tenants/acme/disconnect']) {
      assert.equal((await http(admin, path, { method: 'POST' })).status, 401, path);
    }
    // The refused POST did nothing.
    assert.equal(p.proxy.ctx.tenants.get('acme')!.paused, false);
  });

  test('Authorization: Bearer <token> → 200; a wrong or malformed token → 401', async () => {
    const admin = p.adminPort!;
    const ok = await getJson<{ tenants: TenantView[] }>(admin, '/tenants', 200, { authorization: `Bearer ${TOKEN}` });
    assert.deepEqual(ok.tenants.map((t) => t.id).sort(), ['acme', 'widgetco']);
    const r = await http(admin, '/metrics/prometheus', { headers: { authorization: `Bearer ${TOKEN}` } });
    assert.equal(r.status, 200);
    const wrong = [`Bearer ${TOKEN.slice(0, -1)}x`, `Bearer ${TOKEN}x`, 'Bearer short', `Basic ${TOKEN}`, TOKEN, `bearer  ${TOKEN}`];
    for (const auth of wrong) assert.equal((await http(admin, '/tenants', { headers: { authorization: auth } })).status, 401, auth);
  });

  test('/health and /ready need no token', async () => {
    const admin = p.adminPort!;
    assert.equal((await http(admin, '/health')).status, 200);
    assert.equal((await http(admin, '/ready')).status, 200);
    assert.equal((await http(admin, '/health', { headers: { authorization: 'Bearer wrong' } })).status, 200);
  });
});

// ══ 5: live reload from a file ═══════════════════════════════════════════════════════

describe('live reload from a file (POST /reload)', () => {
  const path = join(tmp, 'reload.toml');
  let proxy: ProxyServer;
  let listenPort: number;
  let adminPort: number;
  let text: string;
  let acmeBefore: Conn;
  const clients = new Clients();
  const write = (t: string): void => writeFileSync(path, t);
  const reload = async (status = 200): Promise<ReloadOk & ErrorBody> => post<ReloadOk & ErrorBody>(adminPort, '/reload', status);

  before(async () => {
    listenPort = await freePort();
    adminPort = await freePort();
    // log_level is reloadable: without it the reloaded default ("info") would un-silence the test logger.
    text = fileConfig(listenPort, adminPort, `log_level = "${process.env.HELIOS_LOG_LEVEL ?? 'silent'}"\n`);
    write(text);
    proxy = await ProxyServer.start(loadConfigFile(path), { logger: silentLogger(), listen: { host: '127.0.0.1', port: listenPort }, admin: { host: '127.0.0.1', port: adminPort } });
    acmeBefore = await clients.open(ACME(listenPort));
    assert.equal(await scalar<number>(acmeBefore, 'SELECT count(*)::int AS n FROM orders'), 3);
  });
  after(async () => {
    await clients.closeAll();
    await settle(proxy.close(), 5000);
    await settle(direct("DELETE FROM orders WHERE customer = 'admin-test-reload'", 'widgetco_db'));
  });

  test('appending the newclient block: added ["newclient"]; newclient reads its 2 orders; the earlier acme session keeps working', T, async () => {
    assert.equal(await stateOf(new pg.Client(clientConfig(listenPort, 'newclient.appuser', 'shared_db')).connect()), '28000', 'newclient is unknown before the reload');
    text += newclientTenantToml();
    write(text);
    const r = await reload();
    assert.equal(r.ok, true);
    assert.deepEqual(r.added, ['newclient']);
    assert.deepEqual(r.removed, []);
    assert.deepEqual([...r.reconfigured].sort(), ['acme', 'widgetco']);
    assert.deepEqual(r.restartRequired, []);

    const nc = await clients.open(clientConfig(listenPort, 'newclient.appuser', 'shared_db'));
    const rows = (await nc.client.query<{ customer: string }>('SELECT customer FROM orders ORDER BY id')).rows.map((x) => x.customer);
    assert.deepEqual(rows, ['newclient-customer-1', 'newclient-customer-2']);
    assert.equal((await failure(nc.client.query('SELECT * FROM acme.orders'))).code, '42501', 'the new tenant is isolated too');

    const acmeRows = (await acmeBefore.client.query<{ customer: string }>('SELECT customer FROM orders ORDER BY id')).rows.map((x) => x.customer);
    assert.deepEqual(acmeRows, ['acme-customer-1', 'acme-customer-2', 'acme-customer-3']);
    assert.deepEqual(acmeBefore.errors, []);

    const view = await getJson<TenantView>(adminPort, '/tenants/newclient');
    assert.equal(view.name, 'New Client Inc');
    assert.deepEqual(view.isolation, { strategy: 'schema', database: 'shared_db', schema: 'newclient' });
    assert.equal(view.limits.qps_limit, 100);
    assert.equal(view.limits.max_connections, 10);
    assert.equal(view.permissions?.allow_ddl, false);
  });

  test('acme qps_limit 1 (burst 1.0) in the file: the existing session gets 53400 from its next statements', T, async () => {
    const limited = edit(edit(text, 'qps_limit          = 1000', 'qps_limit          = 1'), 'burst_multiplier   = 2.0', 'burst_multiplier   = 1.0');
    write(limited);
    const r = await reload();
    assert.ok(r.reconfigured.includes('acme'));
    const view = await getJson<TenantView>(adminPort, '/tenants/acme');
    assert.equal(view.limits.qps_limit, 1);
    assert.equal(view.limits.burst_capacity, 1);
    const codes: (string | null)[] = [];
    for (let i = 0; i < 3; i++) codes.push(await stateOf(acmeBefore.client.query('SELECT 1')));
    assert.ok(codes.slice(0, 2).includes('53400'), `expected 53400 within two statements: ${JSON.stringify(codes)}`);
    // Back to the reference limit: the session is served again at once.
    write(text);
    await reload();
    assert.equal((await getJson<TenantView>(adminPort, '/tenants/acme')).limits.qps_limit, 1000);
    await eventually(async () => (await stateOf(acmeBefore.client.query('SELECT 1'))) === null, 3000, 'acme served again');
  });

  test('changing listen_address: reload ok, restartRequired names listen_address, the proxy stays where it is', T, async () => {
    write(edit(text, `listen_address = "127.0.0.1:${listenPort}"`, `listen_address = "127.0.0.1:${listenPort === 65535 ? 1 : listenPort + 1}"`));
    const r = await reload();
    assert.equal(r.ok, true);
    assert.ok(r.restartRequired.includes('listen_address'), JSON.stringify(r.restartRequired));
    assert.ok(!r.restartRequired.includes('admin_address'));
    const c = await clients.open(ACME(listenPort));
    assert.equal(await scalar<number>(c, 'SELECT 1 AS one'), 1);
    write(text);
    const back = await reload();
    assert.deepEqual(back.restartRequired, [], 'back to the address in use: nothing pending');
  });

  test('removing widgetco: removed ["widgetco"]; new logins refused (28000); an open transaction COMMITs, then ends with 57P01', T, async () => {
    const idle = await clients.open(WIDGETCO(listenPort));
    await idle.client.query('SELECT 1');
    const tx = await clients.open(WIDGETCO(listenPort));
    await tx.client.query('BEGIN');
    await tx.client.query("INSERT INTO orders (customer, amount) VALUES ('admin-test-reload', 1)");

    text = withoutTenant(text, 'widgetco');
    write(text);
    const r = await reload();
    assert.deepEqual(r.removed, ['widgetco']);
    assert.deepEqual(r.added, []);

    const idleErr = await fatalOf(idle, 3000, 'the idle widgetco session to end');
    assert.equal(idleErr.code, '57P01');
    assert.match(idleErr.message, /tenant "widgetco" was removed/);

    const refused = await failure(new pg.Client(WIDGETCO(listenPort)).connect());
    assert.equal(refused.code, '28000');
    assert.match(refused.message, /unknown tenant "widgetco"/);

    // The transaction in flight finishes on its own terms.
    assert.deepEqual(tx.errors, []);
    const seen = await tx.client.query<{ n: number }>("SELECT count(*)::int AS n FROM orders WHERE customer = 'admin-test-reload'");
    assert.equal(seen.rows[0]!.n, 1);
    await within(tx.client.query('COMMIT'), 3000, 'COMMIT');
    const txErr = await fatalOf(tx, 3000, 'the widgetco session to end after COMMIT');
    assert.equal(txErr.code, '57P01');
    assert.ok(await stateOf(tx.client.query('SELECT 1')) !== null, 'the session is over');
    const rows = await direct<{ n: number }>("SELECT count(*)::int AS n FROM orders WHERE customer = 'admin-test-reload'", 'widgetco_db');
    assert.equal(rows[0]!.n, 1, 'the COMMIT committed');
    await direct("DELETE FROM orders WHERE customer = 'admin-test-reload'", 'widgetco_db');

    const { tenants } = await getJson<{ tenants: TenantView[] }>(adminPort, '/tenants');
    assert.deepEqual(tenants.map((t) => t.id).sort(), ['acme', 'newclient']);
    await getJson<ErrorBody>(adminPort, '/tenants/widgetco', 404);
    assert.deepEqual(acmeBefore.errors, []);
  });

  test('a removed tenant\'s dedicated pool lets its backends go once its sessions have ended', T, async () => {
    // Kept warm forever, they would hold connections to a database nobody can reach through the proxy any
    // more (and make DROP DATABASE widgetco_db fail while the proxy runs).
    await eventually(
      async () => {
        const { pools } = await getJson<{ pools: PoolStats[] }>(adminPort, '/pools');
        const w = pools.find((x) => x.name.startsWith('widgetco/'));
        return w === undefined || w.idle + w.active + w.connecting === 0;
      },
      3000,
      'the widgetco dedicated pool to close its backends',
    ).catch(async (err: unknown) => {
      const { pools } = await getJson<{ pools: PoolStats[] }>(adminPort, '/pools');
      assert.fail(`${String(err)}: ${JSON.stringify(pools.filter((x) => x.name.startsWith('widgetco/')))}`);
    });
    const open = await direct<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = 'widgetco_db' AND usename = 'appuser'");
    assert.equal(open[0]!.n, 0, 'no backend connection to widgetco_db left');
  });

  test('a broken file: 400 with problems naming the key; the old configuration keeps serving', T, async () => {
    write(text + '\n[pool\nmax_connections = 1\n');
    const bad = await reload(400);
    assert.match(bad.error.message, /not reloaded/);
    assert.ok(bad.error.problems !== undefined && bad.error.problems.length === 1);
    assert.match(bad.error.problems[0]!, /^not valid TOML/);

    write(edit(edit(text, 'max_tables_per_query = 10', 'max_tables_per_query = 10\nallow_truncate = true'), 'qps_limit          = 1000', 'qps_limit          = 5'));
    const unknown = await reload(400);
    assert.ok(
      unknown.error.problems?.some((x) => x.startsWith('multi_tenancy.tenants[0].permissions.allow_truncate: unknown key')),
      JSON.stringify(unknown.error.problems),
    );

    write('bogus_key = 1\n' + text);
    const top = await reload(400);
    assert.ok(top.error.problems?.some((x) => x.startsWith('bogus_key: unknown key')), JSON.stringify(top.error.problems));

    // Nothing of the broken files applied: same tenants, same limits, sessions served.
    const { tenants } = await getJson<{ tenants: TenantView[] }>(adminPort, '/tenants');
    assert.deepEqual(tenants.map((t) => t.id).sort(), ['acme', 'newclient']);
    assert.equal(tenants.find((t) => t.id === 'acme')!.limits.qps_limit, 1000);
    assert.equal(await scalar<number>(acmeBefore, 'SELECT count(*)::int AS n FROM orders'), 3);
    const nc = await clients.open(clientConfig(listenPort, 'newclient.appuser', 'shared_db'));
    assert.equal(await scalar<number>(nc, 'SELECT count(*)::int AS n FROM orders'), 2);
    assert.equal((await http(adminPort, '/ready')).status, 200);
    write(text);
    assert.equal((await reload()).ok, true, 'the fixed file reloads');
  });
});

// ══ 5b: SIGHUP through the CLI ═══════════════════════════════════════════════════════

describe('SIGHUP reload through the CLI (bin/heliosproxy.js)', () => {
  let h: CliProxy | undefined;
  const clients = new Clients();
  after(async () => {
    await clients.closeAll();
    await stopCli(h);
  });

  test('append newclient, SIGHUP: newclient logs in and reads its orders; an acme session from before keeps working', T, async () => {
    const listenPort = await freePort();
    const adminPort = await freePort();
    const file = join(tmp, 'sighup.toml');
    const text = fileConfig(listenPort, adminPort);
    writeFileSync(file, text);
    h = await spawnCli(file);
    const acme = await clients.open(ACME(listenPort));
    await acme.client.query('SELECT 1');
    assert.equal(await stateOf(new pg.Client(clientConfig(listenPort, 'newclient.appuser', 'shared_db')).connect()), '28000');

    writeFileSync(file, text + newclientTenantToml());
    process.kill(h.child.pid!, 'SIGHUP');
    await eventually(() => h!.output().includes('configuration reloaded'), 5000, 'the reload log line');
    const nc = await clients.open(clientConfig(listenPort, 'newclient.appuser', 'shared_db'));
    const rows = (await nc.client.query<{ customer: string }>('SELECT customer FROM orders ORDER BY id')).rows.map((x) => x.customer);
    assert.deepEqual(rows, ['newclient-customer-1', 'newclient-customer-2']);
    assert.equal(await scalar<number>(acme, 'SELECT count(*)::int AS n FROM orders'), 3);
    assert.deepEqual(acme.errors, []);
    assert.equal(h.child.exitCode, null, 'SIGHUP did not stop the process');
    const r = await runPsql(['-h', '127.0.0.1', '-p', String(listenPort), '-U', 'newclient.appuser', '-d', 'shared_db', '-At', '-c', 'SELECT count(*) FROM orders'], { PGPASSWORD: 'apppass' });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.trim(), '2');
    const { tenants } = await getJson<{ tenants: TenantView[] }>(adminPort, '/tenants');
    assert.deepEqual(tenants.map((t) => t.id).sort(), ['acme', 'newclient', 'widgetco']);
  });
});

// ══ 6: pause / resume / disconnect ═══════════════════════════════════════════════════

describe('pause, resume, disconnect (admin API, transaction mode)', () => {
  let p: TestProxy;
  const clients = new Clients();
  before(async () => {
    p = await startProxy({ admin: true });
  });
  after(async () => {
    p.proxy.ctx.tenants.get('acme')?.resume();
    await clients.closeAll();
    await settle(p.close(), 5000);
  });

  test('pause: a new statement from an idle acme client waits; a transaction in flight finishes; resume releases it', T, async () => {
    const admin = p.adminPort!;
    const idle = await clients.open(ACME(p.port));
    await idle.client.query('SELECT 1');
    const tx = await clients.open(ACME(p.port));
    await tx.client.query('BEGIN');
    await tx.client.query('SELECT 1');
    const w = await clients.open(WIDGETCO(p.port));

    const paused = await post<ActionBody>(admin, '/tenants/acme/pause');
    assert.deepEqual(paused, { tenant: 'acme', action: 'pause', paused: true });
    assert.equal((await getJson<TenantView>(admin, '/tenants/acme')).paused, true);

    let done = false;
    const pending = idle.client.query<{ n: number }>('SELECT 42 AS n');
    pending.then(() => (done = true), () => (done = true));
    await sleep(500);
    assert.equal(done, false, 'the statement waits while acme is paused');

    // In-flight transactions finish; other tenants are not paused.
    assert.equal(await within(scalar<number>(tx, 'SELECT count(*)::int AS n FROM orders'), 2000, 'in-transaction SELECT while paused'), 3);
    await within(tx.client.query('COMMIT'), 2000, 'COMMIT while paused');
    assert.equal(await within(scalar<number>(w, 'SELECT 7 AS n'), 2000, 'widgetco while acme is paused'), 7);
    assert.equal(done, false);

    const resumed = await post<ActionBody>(admin, '/tenants/acme/resume');
    assert.deepEqual(resumed, { tenant: 'acme', action: 'resume', paused: false });
    const r = await within(pending, 3000, 'the paused statement after resume');
    assert.equal(r.rows[0]!.n, 42);
    assert.equal((await getJson<TenantView>(admin, '/tenants/acme')).paused, false);
    assert.deepEqual(idle.errors, []);
  });

  test('disconnect: idle acme sessions end with 57P01, a transaction at its boundary; widgetco untouched; new logins work', T, async () => {
    const admin = p.adminPort!;
    const a1 = await clients.open(ACME(p.port));
    const a2 = await clients.open(ACME(p.port));
    await a2.client.query('SELECT 1');
    const tx = await clients.open(ACME(p.port));
    await tx.client.query('BEGIN');
    await tx.client.query('SELECT 1');
    const w = await clients.open(WIDGETCO(p.port));

    const body = await post<ActionBody>(admin, '/tenants/acme/disconnect');
    assert.deepEqual(body, { tenant: 'acme', action: 'disconnect', paused: false });
    for (const c of [a1, a2]) {
      const err = await fatalOf(c, 3000, 'an idle acme session to end');
      assert.equal(err.code, '57P01');
      assert.match(err.message, /terminating connection/);
    }
    assert.deepEqual(tx.errors, [], 'the transaction is not cut');
    assert.equal(await scalar<number>(tx, 'SELECT count(*)::int AS n FROM orders'), 3);
    await within(tx.client.query('COMMIT'), 2000, 'COMMIT');
    assert.equal((await fatalOf(tx, 3000, 'the acme transaction to end at COMMIT')).code, '57P01');

    assert.equal(await scalar<number>(w, 'SELECT 1 AS one'), 1);
    assert.deepEqual(w.errors, []);
    const fresh = await clients.open(ACME(p.port));
    assert.equal(await scalar<number>(fresh, 'SELECT count(*)::int AS n FROM orders'), 3);
    await eventually(async () => (await getJson<TenantView>(admin, '/tenants/acme')).live.clients === 1, 3000, 'acme down to the new client');
  });
});

// ══ 7: graceful shutdown through the CLI ═════════════════════════════════════════════

describe('graceful shutdown through the CLI (SIGTERM)', () => {
  const TABLE = 'acme.admin_test_shutdown';
  const clients = new Clients();
  let h: CliProxy | undefined;
  before(async () => {
    await direct(`SET ROLE appuser; DROP TABLE IF EXISTS ${TABLE}; CREATE TABLE ${TABLE} (id int PRIMARY KEY, note text)`, 'shared_db');
  });
  after(async () => {
    await clients.closeAll();
    await stopCli(h);
    await settle(direct(`DROP TABLE IF EXISTS ${TABLE}`, 'shared_db'));
  });

  async function start(timeoutSecs: number): Promise<{ port: number; h: CliProxy }> {
    const listenPort = await freePort();
    const adminPort = await freePort();
    const file = join(tmp, `shutdown-${timeoutSecs}.toml`);
    writeFileSync(file, fileConfig(listenPort, adminPort, `shutdown_timeout_secs = ${timeoutSecs}\n`));
    h = await spawnCli(file);
    return { port: listenPort, h };
  }

  const rowCount = async (id: number): Promise<number> => (await direct<{ n: number }>(`SELECT count(*)::int AS n FROM ${TABLE} WHERE id = $1`, 'shared_db', [id]))[0]!.n;

  test('shutdown_timeout_secs = 5: idle client 57P01, new connections refused, the open transaction COMMITs, exit 0', T, async () => {
    const { port, h: cli } = await start(5);
    const idle = await clients.open(ACME(port));
    await idle.client.query('SELECT 1');
    const tx = await clients.open(ACME(port));
    await tx.client.query('BEGIN');
    await tx.client.query(`INSERT INTO ${TABLE} (id, note) VALUES (1, 'committed during shutdown')`);

    const t0 = Date.now();
    cli.child.kill('SIGTERM');
    const idleErr = await fatalOf(idle, 3000, 'the idle client to be ended');
    assert.equal(idleErr.code, '57P01');
    assert.match(idleErr.message, /terminating connection/);

    assert.ok((await stateOf(new pg.Client(ACME(port)).connect())) !== null, 'a new connection is refused');
    assert.equal(cli.child.exitCode, null, 'the process waits for the transaction in flight');
    assert.deepEqual(tx.errors, []);

    await within(tx.client.query('COMMIT'), 3000, 'COMMIT during shutdown');
    const { code, signal } = await within(cli.exited, 6000, 'the process to exit');
    const elapsed = Date.now() - t0;
    assert.equal(signal, null);
    assert.equal(code, 0, cli.output());
    assert.ok(elapsed < 5000, `exited ${elapsed} ms after SIGTERM (timeout 5 s)`);
    assert.match(cli.output(), /shutting down/);
    assert.equal(await rowCount(1), 1, 'the transaction committed');
  });

  test('shutdown_timeout_secs = 1: a transaction that does not finish is ended with 57P01 and rolled back', T, async () => {
    const { port, h: cli } = await start(1);
    const tx = await clients.open(ACME(port));
    await tx.client.query('BEGIN');
    await tx.client.query(`INSERT INTO ${TABLE} (id, note) VALUES (2, 'must roll back')`);

    const t0 = Date.now();
    cli.child.kill('SIGTERM');
    const err = await fatalOf(tx, 5000, 'the transaction to be ended');
    const endedAfter = Date.now() - t0;
    assert.equal(err.code, '57P01');
    assert.match(err.message, /terminating connection/);
    assert.ok(endedAfter >= 800, `ended after ${endedAfter} ms: the transaction had its shutdown_timeout_secs`);
    assert.ok(endedAfter < 3500, `ended after ${endedAfter} ms (timeout 1 s)`);
    const { code, signal } = await within(cli.exited, 5000, 'the process to exit');
    assert.equal(signal, null);
    assert.equal(code, 0, cli.output());
    assert.ok(await stateOf(tx.client.query('COMMIT')) !== null, 'nothing can commit it any more');
    assert.equal(await rowCount(2), 0, 'rolled back');
    await eventually(
      async () => (await direct<{ n: number }>("SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = 'appuser' AND state LIKE 'idle in transaction%'"))[0]!.n === 0,
      3000,
      'no backend left in a transaction',
    );
  });
});
