// admin/ owns what operators can see and do over HTTP on admin_address: tenants, pools and metrics as
// JSON or Prometheus text, health and readiness, reload, and pausing, resuming or disconnecting a tenant.
// With admin_token set, every route but /health and /ready needs `Authorization: Bearer <token>`.
import { timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { primaryNode } from '../config/load.js';
import { listenHttp, type HttpListener } from '../http/listen.js';
import { nativeSocketStats } from '../io/native-socket.js';
import { backendLabel, connectBackend } from '../pool/server-connection.js';
import type { ServerTlsMaterial } from '../protocol/tls.js';
import type { ProxyServer } from '../server.js';
import type { Tenant } from '../tenancy/registry.js';
import { REJECTION_REASONS } from './metrics.js';
import { STATUS_PAGE } from './status-page.js';

export class AdminServer {
  private readyCache: { at: number; ok: boolean; error: string | null } = { at: 0, ok: false, error: null };

  private constructor(
    private readonly proxy: ProxyServer,
    readonly listener: HttpListener,
  ) {}

  static async start(proxy: ProxyServer, at: { host: string; port: number }, tls: ServerTlsMaterial | null): Promise<AdminServer> {
    let admin: AdminServer | null = null;
    const listener = await listenHttp(
      at,
      (req, res) => {
        admin!.handle(req, res).catch((err: unknown) => {
          proxy.log.error({ err: String(err) }, 'admin request failed');
          if (!res.headersSent) admin!.send(res, 500, { error: { message: 'internal error' } });
        });
      },
      tls,
    );
    admin = new AdminServer(proxy, listener);
    const loopback = /^(127\.|::1$|localhost$)/.test(at.host);
    if (!loopback && proxy.config.admin_token === undefined) {
      proxy.log.warn(`WARNING: the admin API listens on ${at.host}:${listener.port} without admin_token: anyone who can reach it can reload, pause and disconnect tenants. Set admin_token.`);
    }
    return admin;
  }

  private authorized(req: IncomingMessage): boolean {
    const token = this.proxy.config.admin_token;
    if (token === undefined) return true;
    const header = req.headers.authorization ?? '';
    const m = /^Bearer (.+)$/.exec(header);
    if (m === null) return false;
    const got = Buffer.from(m[1]!);
    const want = Buffer.from(token);
    return got.length === want.length && timingSafeEqual(got, want);
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://admin');
    const path = url.pathname.replace(/\/+$/, '') || '/';
    const method = req.method ?? 'GET';
    if (path === '/health') return this.send(res, 200, { status: 'ok', uptime_secs: this.uptime() });
    if (path === '/ready') {
      // Draining: tell load balancers to stop sending clients before the listener closes.
      if (this.proxy.ctx.shuttingDown) return this.send(res, 503, { status: 'not ready', error: 'shutting down' });
      const r = await this.ready();
      return this.send(res, r.ok ? 200 : 503, r.ok ? { status: 'ready' } : { status: 'not ready', error: r.error });
    }
    if (!this.authorized(req)) {
      res.setHeader('www-authenticate', 'Bearer');
      return this.send(res, 401, { error: { message: 'missing or wrong admin token (Authorization: Bearer …)' } });
    }
    if (method === 'GET') {
      if (path === '/') return this.sendText(res, 200, 'text/html; charset=utf-8', STATUS_PAGE);
      if (path === '/tenants') return this.send(res, 200, { tenants: this.proxy.ctx.tenants.all().map((t) => this.tenantView(t)) });
      const tenantRoute = /^\/tenants\/([^/]+)(\/metrics)?$/.exec(path);
      if (tenantRoute !== null) {
        const t = this.tenant(tenantRoute[1]!);
        if (t === undefined) return this.unknownTenant(res, tenantRoute[1]!);
        return this.send(res, 200, tenantRoute[2] ? await this.tenantMetrics(t) : this.tenantView(t));
      }
      if (path === '/pools') return this.send(res, 200, { pools: this.proxy.ctx.pools.all().map((p) => p.stats()) });
      if (path === '/metrics/prometheus') return this.prometheus(res);
      if (path === '/metrics') {
        const accept = req.headers.accept ?? '';
        if (/text\/plain|application\/openmetrics-text/.test(accept) && !/application\/json/.test(accept)) {
          return this.prometheus(res);
        }
        return this.send(res, 200, await this.globalMetrics());
      }
    }
    if (method === 'POST') {
      if (path === '/reload') {
        const r = this.proxy.reload();
        return this.send(res, r.ok ? 200 : 400, r.ok ? r : { error: { message: 'configuration not reloaded', problems: r.problems } });
      }
      const action = /^\/tenants\/([^/]+)\/(pause|resume|disconnect)$/.exec(path);
      if (action !== null) {
        const t = this.tenant(action[1]!);
        if (t === undefined) return this.unknownTenant(res, action[1]!);
        if (action[2] === 'pause') t.pause();
        else if (action[2] === 'resume') t.resume();
        else this.proxy.disconnectTenant(t);
        return this.send(res, 200, { tenant: t.id, action: action[2], paused: t.paused });
      }
    }
    const known = ['/', '/tenants', '/pools', '/metrics', '/metrics/prometheus', '/reload'].includes(path) || /^\/tenants\//.test(path);
    return this.send(res, known ? 405 : 404, { error: { message: known ? `method ${method} not allowed on ${path}` : `no route ${path}` } });
  }

  private tenant(raw: string): Tenant | undefined {
    return this.proxy.ctx.tenants.get(decodeURIComponent(raw));
  }

  private unknownTenant(res: ServerResponse, raw: string): void {
    this.send(res, 404, { error: { message: `unknown tenant "${decodeURIComponent(raw)}"` } });
  }

  private uptime(): number {
    return Math.round((Date.now() - this.proxy.startedAt) / 1000);
  }

  private poolsOf(t: Tenant): { active: number; idle: number; waiting: number } {
    let active = 0;
    let idle = 0;
    let waiting = 0;
    for (const p of this.proxy.ctx.pools.all()) {
      const s = p.stats();
      const mine = t.pool.dedicated_pool ? s.name.startsWith(`${t.id}/`) : s.name.startsWith('shared/') && s.database === t.database;
      if (!mine) continue;
      active += s.active;
      idle += s.idle;
      waiting += s.waiting;
    }
    return { active, idle, waiting };
  }

  private tenantView(t: Tenant): object {
    const perms = t.rules.permissions;
    return {
      id: t.id,
      name: t.name,
      origin: t.origin,
      paused: t.paused,
      isolation: { strategy: t.strategy, database: t.database, schema: t.schema },
      pool: { max_connections: t.pool.max_connections, min_idle: t.pool.min_idle ?? null, dedicated_pool: t.pool.dedicated_pool },
      limits: {
        qps_limit: t.bucket?.rate ?? null,
        burst_capacity: t.bucket?.capacity ?? null,
        max_connections: t.maxClients,
        max_query_duration_secs: t.maxDurationMs === null ? null : t.maxDurationMs / 1000,
        max_result_size: t.maxResultBytes,
        max_rows_per_query: t.maxRows,
      },
      permissions: perms,
      live: {
        clients: t.clients,
        backends_in_use: t.backendsInUse,
        // Shared pools are shared: their idle/waiting figures are the pool's, for every tenant on it.
        backends: this.poolsOf(t),
      },
    };
  }

  private async tenantMetrics(t: Tenant): Promise<object> {
    return {
      tenant: t.id,
      queries: t.stats.queries,
      errors: t.stats.errors,
      rejections: { ...t.stats.rejections, total: REJECTION_REASONS.reduce((n, r) => n + t.stats.rejections[r], 0) },
      rows: t.stats.rows,
      bytes: t.stats.bytes,
      http: { requests: t.stats.httpRequests, failed: t.stats.httpFailed },
      qps: this.proxy.ctx.metrics.rateOf(t),
      bucket_level: t.bucket === null ? null : Math.floor(t.bucket.level),
      latency: this.proxy.ctx.metrics.latencySummary(t.id),
      clients: t.clients,
      backends_in_use: t.backendsInUse,
      pool: this.poolsOf(t),
    };
  }

  private async globalMetrics(): Promise<object> {
    const tenants = this.proxy.ctx.tenants.allWithPassthrough();
    const sum = (f: (t: Tenant) => number): number => tenants.reduce((n, t) => n + f(t), 0);
    const rejections: Record<string, number> = {};
    for (const r of REJECTION_REASONS) rejections[r] = sum((t) => t.stats.rejections[r]);
    const pools = this.proxy.ctx.pools.all().map((p) => p.stats());
    const mem = process.memoryUsage();
    return {
      uptime_secs: this.uptime(),
      tenants: this.proxy.ctx.tenants.all().length,
      clients: this.proxy.ctx.sessions.size,
      socket_layer: { mode: this.proxy.ctx.nativeSocket ? 'native' : 'node', native_sockets: nativeSocketStats.open },
      queries: sum((t) => t.stats.queries),
      errors: sum((t) => t.stats.errors),
      rejections: { ...rejections, total: Object.values(rejections).reduce((a, b) => a + b, 0) },
      rows: sum((t) => t.stats.rows),
      bytes: sum((t) => t.stats.bytes),
      http: { requests: sum((t) => t.stats.httpRequests), failed: sum((t) => t.stats.httpFailed) },
      qps: Math.round(tenants.reduce((n, t) => n + this.proxy.ctx.metrics.rateOf(t), 0) * 10) / 10,
      latency: this.proxy.ctx.metrics.latencySummary(null),
      backends: {
        active: pools.reduce((n, p) => n + p.active, 0),
        idle: pools.reduce((n, p) => n + p.idle, 0),
        connecting: pools.reduce((n, p) => n + p.connecting, 0),
        waiting: pools.reduce((n, p) => n + p.waiting, 0),
      },
      memory: { rss_bytes: mem.rss, heap_used_bytes: mem.heapUsed },
    };
  }

  /** Prometheus text exposition (0.0.4), which Prometheus also accepts when it asks for OpenMetrics. */
  private async prometheus(res: ServerResponse): Promise<void> {
    const metrics = this.proxy.ctx.metrics;
    this.sendText(res, 200, metrics.registry.contentType, await metrics.prometheusText());
  }

  /** Readiness: the primary accepts connections (checked at most once a second). */
  private ready(): Promise<{ ok: boolean; error: string | null }> {
    const now = Date.now();
    if (now - this.readyCache.at < 1000) return Promise.resolve(this.readyCache);
    const node = primaryNode(this.proxy.config);
    return new Promise((resolve) => {
      const s = connectBackend(node.host, node.port);
      const where = backendLabel(node.host, node.port);
      const done = (ok: boolean, error: string | null): void => {
        s.destroy();
        this.readyCache = { at: Date.now(), ok, error };
        resolve(this.readyCache);
      };
      s.setTimeout(1000, () => done(false, `timed out connecting to ${where}`));
      s.once('connect', () => done(true, null));
      s.once('error', (err) => done(false, `cannot reach the primary ${where}: ${err.message}`));
    });
  }

  send(res: ServerResponse, status: number, body: object): void {
    this.sendText(res, status, 'application/json; charset=utf-8', JSON.stringify(body, null, 2) + '\n');
  }

  private sendText(res: ServerResponse, status: number, type: string, text: string): void {
    res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
    res.end(text);
  }

}
