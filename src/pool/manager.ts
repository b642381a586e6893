// pool/ owns backend connections. The PoolManager decides which Pool serves a tenant's role: the shared
// pool (capped as a whole by [pool].max_connections) or the tenant's dedicated pool, and runs the upkeep.
import type { BackendTlsPolicy } from '../protocol/tls.js';
import type { CredentialStore } from '../auth/credentials.js';
import type { Config } from '../config/schema.js';
import type { Tenant } from '../tenancy/registry.js';
import { Pool, PoolGroup, type PoolLimits } from './pool.js';

export class PoolManager {
  readonly shared: PoolGroup;
  private readonly dedicated = new Map<string, PoolGroup>();
  private readonly pools = new Map<string, Pool>();
  /** Which tenant's settings a pool's limits come from (any tenant of that database for shared pools). */
  private readonly poolTenants = new Map<string, string>();
  private readonly lastTenant = new Map<string, Tenant>();
  private readonly timer: NodeJS.Timeout;

  constructor(
    private config: Config,
    private readonly backend: { host: string; port: number; tls?: BackendTlsPolicy; nativeSocket?: boolean },
    private readonly credentials: CredentialStore,
    private readonly tenants: () => Tenant[],
  ) {
    this.shared = new PoolGroup('shared pool', config.pool.max_connections);
    this.timer = setInterval(() => this.maintain(), 1000);
    this.timer.unref();
  }

  /** The pool a tenant's connections for `role` come from. */
  poolFor(tenant: Tenant, role: string): Pool {
    const dedicated = tenant.pool.dedicated_pool;
    const key = `${dedicated ? tenant.id : ''}\0${tenant.database}\0${role}`;
    let pool = this.pools.get(key);
    if (pool === undefined) {
      const group = dedicated ? this.dedicatedGroup(tenant) : this.shared;
      const name = dedicated ? `${tenant.id}/${tenant.database}/${role}` : `shared/${tenant.database}/${role}`;
      pool = new Pool(
        name,
        { host: this.backend.host, port: this.backend.port, database: tenant.database, role, nativeSocket: this.backend.nativeSocket === true, ...(this.backend.tls ? { tls: this.backend.tls } : {}) },
        this.limitsFor(tenant),
        group,
        () => this.credentials.backendSecret(role),
      );
      this.pools.set(key, pool);
      this.poolTenants.set(key, tenant.id);
    }
    this.lastTenant.set(key, tenant);
    return pool;
  }

  private dedicatedGroup(tenant: Tenant): PoolGroup {
    let g = this.dedicated.get(tenant.id);
    if (g === undefined) {
      g = new PoolGroup(`${tenant.id} dedicated pool`, tenant.pool.max_connections);
      this.dedicated.set(tenant.id, g);
    }
    return g;
  }

  /**
   * Shared pools take [pool]'s timeouts and min_connections (raised by the min_idle of shared tenants on the
   * same database); dedicated pools take [pool_mode]'s, with the tenant's min_idle. [pool_mode].max_pool_size
   * caps every single pool.
   */
  private limitsFor(tenant: Tenant): PoolLimits {
    const c = this.config;
    if (tenant.pool.dedicated_pool) {
      return {
        maxSize: Math.min(tenant.pool.max_connections, c.pool_mode.max_pool_size),
        minIdle: tenant.pool.min_idle ?? c.pool_mode.min_idle,
        idleTimeoutMs: c.pool_mode.idle_timeout_secs * 1000,
        maxLifetimeMs: c.pool_mode.max_lifetime_secs * 1000,
        acquireTimeoutMs: c.pool_mode.acquire_timeout_secs * 1000,
        testOnAcquire: c.pool.test_on_acquire,
      };
    }
    let minIdle = c.pool.min_connections;
    for (const t of this.tenants()) {
      if (!t.pool.dedicated_pool && t.database === tenant.database) minIdle = Math.max(minIdle, t.pool.min_idle ?? 0);
    }
    return {
      maxSize: c.pool_mode.max_pool_size,
      minIdle: Math.min(minIdle, c.pool_mode.max_pool_size),
      idleTimeoutMs: c.pool.idle_timeout_secs * 1000,
      maxLifetimeMs: c.pool.max_lifetime_secs * 1000,
      acquireTimeoutMs: c.pool.acquire_timeout_secs * 1000,
      testOnAcquire: c.pool.test_on_acquire,
    };
  }

  all(): Pool[] {
    return [...this.pools.values()];
  }

  /**
   * Applies reloaded pool settings: group caps and every pool's limits. Shrinking never drops a busy
   * connection: surplus idle ones close now, busy ones close when released.
   */
  reconfigure(config: Config, tenantById: (id: string) => Tenant | undefined): void {
    this.config = config;
    this.shared.max = config.pool.max_connections;
    for (const [key, pool] of this.pools) {
      const owner = this.poolTenants.get(key);
      const current = owner === undefined ? undefined : tenantById(owner);
      const tenant = current ?? this.lastTenant.get(key);
      if (tenant === undefined) continue;
      pool.limits = this.limitsFor(tenant);
      if (current === undefined && tenant.pool.dedicated_pool) {
        // The tenant was removed: its dedicated pool keeps nothing warm and lets idle connections go.
        pool.limits = { ...pool.limits, minIdle: 0, idleTimeoutMs: 1 };
      }
      pool.trimToLimits();
    }
    for (const [id, group] of this.dedicated) {
      const t = tenantById(id);
      if (t !== undefined) group.max = t.pool.max_connections;
    }
    this.shared.pumpAll();
  }

  private maintain(): void {
    const now = performance.now(); // the clock of ServerConnection.createdAt/lastUsedAt
    for (const p of this.pools.values()) p.maintain(now);
  }

  shutdown(): void {
    clearInterval(this.timer);
    for (const p of this.pools.values()) p.shutdown();
    this.pools.clear();
  }
}
