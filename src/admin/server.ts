// admin/ owns the operators' HTTP API on admin_address: what the proxy is serving right now, as JSON.
// Read-only views of tenants, pools and process figures; every route answers JSON, unknown routes 404.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { ProxyServer } from '../server.js';

export class AdminServer {
  port = 0;
  address = '';

  private constructor(
    private readonly proxy: ProxyServer,
    private readonly http: Server,
  ) {}

  static async start(proxy: ProxyServer, at: { host: string; port: number }): Promise<AdminServer> {
    const http = createServer();
    const admin = new AdminServer(proxy, http);
    http.on('request', (req: IncomingMessage, res: ServerResponse) => admin.handle(req, res));
    await new Promise<void>((resolve, reject) => {
      http.once('error', reject);
      http.listen(at.port, at.host, () => {
        http.off('error', reject);
        resolve();
      });
    });
    const addr = http.address();
    if (addr !== null && typeof addr === 'object') {
      admin.port = addr.port;
      admin.address = `${addr.address}:${addr.port}`;
    }
    return admin;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://admin');
    const path = url.pathname.replace(/\/+$/, '') || '/';
    if (req.method !== 'GET') return this.send(res, 405, { error: { message: `method ${req.method} not allowed` } });
    if (path === '/health') return this.send(res, 200, { status: 'ok' });
    if (path === '/tenants') return this.send(res, 200, { tenants: this.tenants() });
    const m = /^\/tenants\/([^/]+)$/.exec(path);
    if (m !== null) {
      const t = this.tenants().find((x) => x.id === decodeURIComponent(m[1]!));
      return t === undefined ? this.send(res, 404, { error: { message: `unknown tenant "${decodeURIComponent(m[1]!)}"` } }) : this.send(res, 200, t);
    }
    if (path === '/pools') return this.send(res, 200, { pools: this.proxy.ctx.pools.all().map((p) => p.stats()) });
    if (path === '/metrics') return this.send(res, 200, this.metrics());
    return this.send(res, 404, { error: { message: `no route ${path}` } });
  }

  private tenants(): { id: string; name: string; isolation: { strategy: string; database: string; schema: string | null }; pool: object; clients: number; backends_in_use: number }[] {
    return this.proxy.ctx.tenants.all().map((t) => ({
      id: t.id,
      name: t.name,
      origin: t.origin,
      isolation: { strategy: t.strategy, database: t.database, schema: t.schema },
      pool: { max_connections: t.pool.max_connections, min_idle: t.pool.min_idle ?? null, dedicated_pool: t.pool.dedicated_pool },
      clients: t.clients,
      backends_in_use: t.backendsInUse,
    }));
  }

  private metrics(): object {
    const pools = this.proxy.ctx.pools.all().map((p) => p.stats());
    const mem = process.memoryUsage();
    return {
      uptime_secs: Math.round((Date.now() - this.proxy.startedAt) / 1000),
      clients: this.proxy.ctx.sessions.size,
      backends: {
        idle: pools.reduce((n, p) => n + p.idle, 0),
        active: pools.reduce((n, p) => n + p.active, 0),
        waiting: pools.reduce((n, p) => n + p.waiting, 0),
      },
      memory: { rss_bytes: mem.rss, heap_used_bytes: mem.heapUsed },
    };
  }

  private send(res: ServerResponse, status: number, body: object): void {
    const text = JSON.stringify(body, null, 2) + '\n';
    res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.http.close(() => resolve());
      this.http.closeAllConnections();
    });
  }
}
