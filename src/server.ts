// The composition root: builds credentials, tenants, pools and the cancel registry from a loaded config,
// listens for PostgreSQL clients, and gives each accepted socket a ClientSession. Owns process-wide
// lifecycle (start, graceful close); every per-connection decision lives in session/.
import { createServer, type Server, type Socket } from 'node:net';
import { pino, type Logger } from 'pino';
import { ProxyMetrics } from './admin/metrics.js';
import { AdminServer } from './admin/server.js';
import { CredentialStore } from './auth/credentials.js';
import { ConfigError, loadConfigFile, primaryNode, splitAddress, type LoadedConfig } from './config/load.js';
import type { Config } from './config/schema.js';
import { bindText, cancelRequest, errorResponse, execute, parse, SYNC } from './protocol/messages.js';
import { PoolManager } from './pool/manager.js';
import { backendTlsOptions, type BackendTlsPolicy, type ServerTlsMaterial } from './protocol/tls.js';
import { HttpGateway } from './http/gateway.js';
import { backendLabel, connectBackend, ServerConnection } from './pool/server-connection.js';
import { CancelRegistry } from './session/cancel.js';
import { nativeSocketLayer } from './io/native-socket.js';
import { ClientSession, type SessionContext } from './session/client-session.js';
import { FactsCache } from './policy/cache.js';
import { loadParser } from './policy/classify.js';
import { TenantRegistry, type Tenant } from './tenancy/registry.js';

export interface StartOptions {
  logger?: Logger;
  /** Overrides listen_address (tests and the demo use free ports). */
  listen?: { host: string; port: number };
  /** Overrides admin_address; null disables the admin API. */
  admin?: { host: string; port: number } | null;
  /** Overrides http_gateway.listen_address; null disables the HTTP endpoint. */
  gateway?: { host: string; port: number } | null;
}

export class ProxyServer {
  readonly ctx: SessionContext;
  readonly startedAt = Date.now();
  private readonly server: Server;
  private admin: AdminServer | null = null;
  private authConn: Promise<ServerConnection> | null = null;
  private authChain: Promise<unknown> = Promise.resolve();
  port = 0;
  host = '';

  private constructor(
    public loaded: LoadedConfig,
    readonly log: Logger,
  ) {
    const config = loaded.config;
    const node = primaryNode(config);
    const credentials = new CredentialStore(config.auth, loaded.baseDir);
    const tenants = new TenantRegistry(config.multi_tenancy);
    this.backendTls = backendTlsOptions(config.backend_tls, loaded.baseDir);
    // socket_layer as it takes effect: "auto" without the built addon is Node's sockets.
    const nativeSocket = config.socket_layer !== 'node' && nativeSocketLayer.available;
    const pools = new PoolManager(
      config,
      { host: node.host, port: node.port, tls: this.backendTls, nativeSocket },
      credentials,
      () => tenants.all(),
    );
    const sessions = new Set<ClientSession>();
    const ctx: SessionContext = {
      config,
      credentials,
      tenants,
      pools,
      metrics: new ProxyMetrics(() => tenants.allWithPassthrough(), () => pools, () => sessions.size),
      cancels: new CancelRegistry(),
      log,
      sessions,
      running: new Set(),
      statements: new FactsCache(),
      sendCancel: (s) => this.sendCancel(s),
      shuttingDown: false,
      tls: null,
      jwt: null,
      nativeSocket,
    };
    this.ctx = ctx;
    this.loadIdentityMaterial(loaded);
    credentials.setAuthQueryRunner((role) => this.runAuthQuery(role));
    this.server = createServer({ noDelay: true }, (socket) => this.accept(socket));
    // One timer for every statement's max_query_duration, not one per statement.
    this.durationWatch = setInterval(() => {
      const now = performance.now();
      for (const session of ctx.running) if (!session.checkDuration(now)) ctx.running.delete(session);
    }, 100);
    this.durationWatch.unref();
  }

  private readonly durationWatch: NodeJS.Timeout;
  private tlsMaterial: ServerTlsMaterial | null = null;
  /** [backend_tls] as read at start (changing it needs a restart). */
  private readonly backendTls: BackendTlsPolicy;
  private gateway: HttpGateway | null = null;

  /** The certificate and JWT keys config load read and checked (a reload brings freshly read ones). */
  private loadIdentityMaterial(loaded: LoadedConfig): void {
    this.tlsMaterial = loaded.tls;
    this.ctx.tls = loaded.tls?.context ?? null;
    this.ctx.jwt = loaded.jwt;
  }

  static async start(loaded: LoadedConfig, opts: StartOptions = {}): Promise<ProxyServer> {
    const log = opts.logger ?? pino({ level: loaded.config.log_level, base: { service: 'heliosproxy' } });
    await loadParser();
    const proxy = new ProxyServer(loaded, log);
    if (loaded.notEnforced.length > 0) {
      log.warn(`WARNING: these keys load but are not enforced yet: ${loaded.notEnforced.join(', ')}`);
    }
    const listen = opts.listen ?? splitAddress(loaded.config.listen_address);
    await new Promise<void>((resolve, reject) => {
      proxy.server.once('error', reject);
      proxy.server.listen(listen.port, listen.host, () => {
        proxy.server.off('error', reject);
        resolve();
      });
    });
    const addr = proxy.server.address();
    if (addr !== null && typeof addr === 'object') {
      proxy.port = addr.port;
      proxy.host = addr.address;
    }
    const adminAddr = opts.admin === undefined ? (loaded.config.admin_address ? splitAddress(loaded.config.admin_address) : null) : opts.admin;
    if (adminAddr !== null) {
      try {
        proxy.admin = await AdminServer.start(proxy, adminAddr, loaded.config.admin_tls ? proxy.tlsMaterial : null);
      } catch (err) {
        await proxy.close();
        throw err;
      }
    }
    const gw = loaded.config.http_gateway;
    const gatewayAddr = opts.gateway === undefined ? (gw !== undefined ? splitAddress(gw.listen_address) : null) : opts.gateway;
    if (gatewayAddr !== null && gw !== undefined) {
      try {
        proxy.gateway = await HttpGateway.start(proxy, gatewayAddr, gw.tls ? proxy.tlsMaterial : null);
      } catch (err) {
        await proxy.close();
        throw err;
      }
    }
    const node = primaryNode(loaded.config);
    log.info({ listen: `${proxy.host}:${proxy.port}`, admin: proxy.admin?.listener.address ?? null, http: proxy.gateway?.listener.address ?? null, tls: loaded.config.tls?.mode ?? 'disable', backend: backendLabel(node.host, node.port), mode: loaded.config.pool_mode.mode, socketLayer: proxy.ctx.nativeSocket ? 'native' : 'node' }, 'heliosproxy listening');
    if (loaded.config.socket_layer === 'auto' && !nativeSocketLayer.available) log.warn({ reason: nativeSocketLayer.reason }, 'relaying on Node sockets');
    return proxy;
  }

  get config(): Config {
    return this.ctx.config;
  }

  get adminPort(): number | null {
    return this.admin?.listener.port ?? null;
  }

  get gatewayPort(): number | null {
    return this.gateway?.listener.port ?? null;
  }

  private accept(socket: Socket): void {
    socket.on('error', () => {}); // a reset before the session attaches must not crash the process
    if (this.ctx.shuttingDown) {
      socket.end(errorResponse({ severity: 'FATAL', code: '57P01', message: 'the proxy is shutting down' }));
      return;
    }
    const session = new ClientSession(socket, this.ctx);
    this.ctx.sessions.add(session);
  }

  /**
   * A CancelRequest travels on its own connection, as the protocol requires. PostgreSQL signals the backend
   * before closing that connection, so until the close the backend is kept from serving another client:
   * otherwise a cancel racing with release could hit the next client's query.
   */
  private sendCancel(server: ServerConnection): void {
    server.cancelsInFlight++;
    const s = connectBackend(server.target.host, server.target.port);
    s.on('error', (err) => this.log.debug({ err: err.message }, 'cancel request failed'));
    s.once('connect', () => s.end(cancelRequest(server.pid, server.secretKey)));
    s.once('close', () => server.cancelDelivered());
    s.setTimeout(5000, () => s.destroy());
  }

  /** auth_query over one long-lived connection as auth_user, one lookup at a time. */
  private runAuthQuery(role: string): Promise<string | null> {
    const run = async (): Promise<string | null> => {
      const auth = this.config.auth!;
      if (this.authConn === null) {
        const secret = this.ctx.credentials.authUserSecret();
        if (secret === null) throw new Error(`auth.auth_user "${auth.auth_user}" has no entry in auth_file`);
        const node = primaryNode(this.config);
        this.authConn = ServerConnection.connect({ host: node.host, port: node.port, database: auth.auth_database, role: auth.auth_user!, tls: this.backendTls }, secret, 10_000);
      }
      let conn: ServerConnection;
      try {
        conn = await this.authConn;
      } catch (err) {
        this.authConn = null;
        throw err;
      }
      if (conn.closed) {
        this.authConn = null;
        return run();
      }
      const res = await conn.exchange(Buffer.concat([parse('', auth.auth_query), bindText('', '', [role]), execute(''), SYNC]));
      if (res.error !== null) throw res.error;
      const row = res.rows[0];
      return row === undefined ? null : (row[1] ?? null);
    };
    const p = this.authChain.then(run, run);
    this.authChain = p.catch(() => undefined);
    return p;
  }

  /**
   * Re-reads the config file. A file with problems changes nothing (the old configuration keeps serving);
   * otherwise tenants, limits, permissions, pools, pool mode, identification, auth_file and log level
   * apply at once, and keys that cannot change under a running proxy are reported as needing a restart.
   */
  reload(): ReloadResult {
    const path = this.loaded.path;
    if (path === undefined) return { ok: false, problems: ['this proxy was not started from a config file'] };
    let next: LoadedConfig;
    try {
      next = loadConfigFile(path);
    } catch (err) {
      const problems = err instanceof ConfigError ? err.problems : [String(err)];
      this.log.error({ problems }, 'reload failed: the previous configuration stays in force');
      return { ok: false, problems };
    }
    return this.apply(next);
  }

  /** Applies an already validated configuration (reload, and tests). */
  apply(next: LoadedConfig): ReloadResult {
    const prev = this.ctx.config;
    const c = next.config;
    const restartRequired: string[] = [];
    if (c.listen_address !== prev.listen_address) restartRequired.push('listen_address');
    if (c.admin_address !== prev.admin_address) restartRequired.push('admin_address');
    const [pn, nn] = [primaryNode(prev), primaryNode(c)];
    if (pn.host !== nn.host || pn.port !== nn.port) restartRequired.push('nodes (primary host/port)');
    if ((prev.auth === undefined) !== (c.auth === undefined)) restartRequired.push('auth (adding or removing the [auth] section)');
    if (JSON.stringify(prev.backend_tls) !== JSON.stringify(c.backend_tls)) restartRequired.push('backend_tls');
    if (c.admin_tls !== prev.admin_tls) restartRequired.push('admin_tls');
    if (c.socket_layer !== prev.socket_layer) restartRequired.push('socket_layer');
    const [pg, ng] = [prev.http_gateway, c.http_gateway];
    if ((pg === undefined) !== (ng === undefined) || pg?.listen_address !== ng?.listen_address || pg?.tls !== ng?.tls) {
      restartRequired.push('http_gateway (adding or removing it, listen_address, tls)');
    }
    // Keys that need a restart keep their old values; everything else takes the new ones.
    c.listen_address = prev.listen_address;
    c.admin_address = prev.admin_address;
    c.backend_tls = prev.backend_tls;
    c.admin_tls = prev.admin_tls;
    c.socket_layer = prev.socket_layer;
    if (restartRequired.includes('http_gateway (adding or removing it, listen_address, tls)')) {
      // The listener stays as it is; keys, role and limits still take their new values.
      if (pg === undefined || ng === undefined) c.http_gateway = prev.http_gateway;
      else c.http_gateway = { ...ng, listen_address: pg.listen_address, tls: pg.tls };
    }
    const keepNode = primaryNode(c);
    keepNode.host = pn.host;
    keepNode.port = pn.port;
    if (restartRequired.includes('auth (adding or removing the [auth] section)')) c.auth = prev.auth;
    else this.ctx.credentials.reloadFile(c.auth, next.baseDir);

    let material: LoadedConfig = next;
    if ((c.tls === undefined || c.tls.mode === 'disable') && this.tlsMaterial !== null && ((this.gateway !== null && c.http_gateway?.tls) || c.admin_tls)) {
      // An HTTPS listener cannot lose its certificate under way.
      c.tls = prev.tls;
      material = { ...next, tls: this.tlsMaterial };
      restartRequired.push('tls (removing it while an HTTPS listener uses it)');
    }
    if (this.gateway !== null && c.http_gateway?.identify_by === 'jwt_claim' && material.jwt === null && this.ctx.jwt !== null) {
      // The running HTTP endpoint verifies JWTs: it keeps the verifier it has until a restart.
      c.multi_tenancy.identification.jwt = prev.multi_tenancy.identification.jwt;
      material = { ...material, jwt: this.ctx.jwt };
      restartRequired.push('multi_tenancy.identification.jwt (removing it while the HTTP endpoint verifies JWTs)');
    }
    this.loadIdentityMaterial(material);
    if (this.tlsMaterial !== null) {
      if (c.http_gateway?.tls) this.gateway?.listener.setTls(this.tlsMaterial);
      if (c.admin_tls) this.admin?.listener.setTls(this.tlsMaterial);
    }

    const tenants = this.ctx.tenants.reconfigure(c.multi_tenancy);
    restartRequired.push(...tenants.restartRequired);
    this.ctx.config = c;
    this.loaded = { ...material, config: c };
    this.ctx.pools.reconfigure(c, (id) => this.ctx.tenants.get(id));
    if (c.log_level !== prev.log_level) this.log.level = c.log_level;
    for (const s of this.ctx.sessions) if (s.identity?.tenant.removed) s.endIfIdle();
    const result: ReloadResult = { ok: true, added: tenants.added, removed: tenants.removed, reconfigured: tenants.changed, restartRequired, notEnforced: next.notEnforced };
    this.log.info(result, 'configuration reloaded');
    if (restartRequired.length > 0) this.log.warn({ keys: restartRequired }, 'these changed keys need a restart to take effect');
    return result;
  }

  /** Ends every session of a tenant at its next transaction boundary (admin API). */
  disconnectTenant(t: Tenant): void {
    for (const s of this.ctx.sessions) if (s.identity?.tenant === t) s.endAtBoundary('terminating connection: disconnected by an operator');
  }

  /**
   * Graceful shutdown: stop accepting, end idle sessions now, let transactions in flight finish for up to
   * `timeoutMs`, then end the rest. All with 57P01, as PostgreSQL's own shutdown.
   */
  async shutdown(timeoutMs = this.config.shutdown_timeout_secs * 1000): Promise<void> {
    this.ctx.shuttingDown = true;
    clearInterval(this.durationWatch);
    const listenerClosed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of [...this.ctx.sessions]) s.endIfIdle();
    const deadline = Date.now() + timeoutMs;
    while (this.ctx.sessions.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    for (const s of [...this.ctx.sessions]) s.fatal({ code: '57P01', message: 'terminating connection: the proxy is shutting down' });
    await listenerClosed;
    this.ctx.pools.shutdown();
    this.ctx.metrics.close();
    if (this.authConn !== null) this.authConn.then((c) => c.close(), () => undefined);
    await this.admin?.listener.close();
    await this.gateway?.listener.close();
  }

  /** Immediate shutdown (tests): every session ends now. */
  close(): Promise<void> {
    return this.shutdown(0);
  }
}

export type ReloadResult =
  | { ok: true; added: string[]; removed: string[]; reconfigured: string[]; restartRequired: string[]; notEnforced: string[] }
  | { ok: false; problems: string[] };

/** Starts a proxy for tests and the benchmark with pino silenced unless asked. */
export function silentLogger(): Logger {
  return pino({ level: process.env.HELIOS_LOG_LEVEL ?? 'silent' });
}
