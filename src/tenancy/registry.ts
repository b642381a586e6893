// tenancy/ owns who a connection belongs to: turning a StartupMessage's user and database into a Tenant,
// a backend role and a backend database, and the runtime Tenant objects (settings plus live counters).
import type { Config, IsolationConfig, TenantConfig, TenantDefaults, TenantPoolConfig } from '../config/schema.js';
import type { LatencyHistogram } from '../admin/metrics.js';
import type { TenantRules } from '../policy/check.js';
import { TokenBucket } from '../policy/rate.js';
import { quoteIdent } from '../protocol/messages.js';

type RateLimits = NonNullable<TenantConfig['rate_limits']>;
type Permissions = NonNullable<TenantConfig['permissions']>;

/** The parts of a tenant's configuration a Tenant is built from (a [[multi_tenancy.tenants]] block or the defaults). */
export interface TenantSettings {
  isolation: IsolationConfig;
  pool: TenantPoolConfig;
  rate_limits?: RateLimits | undefined;
  permissions?: Permissions | undefined;
}

/** Why statements or connections were refused, as counted per tenant. */
export type RejectionReason = 'rate_limit' | 'permission' | 'isolation' | 'connection_cap' | 'duration' | 'result_size' | 'rows' | 'too_long';

/** Counters since start, read by the admin API. */
export class TenantStats {
  queries = 0;
  errors = 0;
  rows = 0;
  bytes = 0;
  /** Authorized requests on the HTTP endpoint, and those answered with an error status. */
  httpRequests = 0;
  httpFailed = 0;
  readonly rejections: Record<RejectionReason, number> = {
    rate_limit: 0,
    permission: 0,
    isolation: 0,
    connection_cap: 0,
    duration: 0,
    result_size: 0,
    rows: 0,
    too_long: 0,
  };
}

export class Tenant {
  /** Live counters, read by pools and the admin API. */
  clients = 0;
  backendsInUse = 0;
  readonly stats = new TenantStats();
  /** Request latency histogram, created by the metrics on first use. */
  latency: LatencyHistogram | null = null;
  /**
   * Bumped by every successful DDL of the tenant. Part of the backend name of prepared statements, so a
   * Parse after a schema change never reuses a statement prepared before it.
   */
  ddlEpoch = 0;
  /** Removed from the configuration by a reload: new logins refused, sessions end at a transaction boundary. */
  removed = false;
  /** Paused by an operator: new transactions wait until resume() (in-flight ones finish). */
  private pauseWaiters: (() => void)[] | null = null;

  readonly strategy: 'schema' | 'database';
  readonly database: string;
  readonly schema: string | null;
  /** search_path the proxy keeps on every backend connection the tenant uses (schema isolation only). */
  readonly searchPath: string | null;
  /** Database names a client may give for this tenant. */
  readonly databaseNames: string[];
  pool: TenantPoolConfig;

  // Guardrails (rate_limits, permissions): replaced as a whole when the configuration changes.
  rules!: TenantRules;
  bucket: TokenBucket | null = null;
  maxDurationMs: number | null = null;
  maxResultBytes: number | null = null;
  maxRows: number | null = null;
  maxClients: number | null = null;
  /** Whether statements must be classified at all: schema isolation, permissions or a QPS limit. */
  checksStatements = false;
  /** Whether results are counted (max_result_size / max_rows_per_query). */
  countsResults = false;
  readOnly = false;

  constructor(
    readonly id: string,
    readonly name: string,
    settings: TenantSettings,
    /** Configured in proxy.toml, auto-created, or an unknown tenant let through. */
    readonly origin: 'configured' | 'auto' | 'passthrough',
  ) {
    const isolation = settings.isolation;
    this.strategy = isolation.strategy;
    this.database = isolation.database_name ?? id;
    this.schema = isolation.strategy === 'schema' ? (isolation.schema_name ?? id) : null;
    this.searchPath = this.schema === null ? null : `${quoteIdent(this.schema)}, public`;
    this.databaseNames = [...new Set([this.database, id, `${id}_db`])];
    this.pool = settings.pool;
    this.configure(settings);
  }

  /** Applies pool caps, limits and permissions (at start and on reload; isolation never changes live). */
  configure(settings: TenantSettings): void {
    this.pool = settings.pool;
    const rl = settings.rate_limits;
    const perms = settings.permissions ?? null;
    this.rules = {
      id: this.id,
      allowedSchemas: this.schema === null ? null : new Set([this.schema, 'public', 'pg_temp']),
      permissions: perms,
    };
    if (rl?.qps_limit !== undefined) {
      const capacity = Math.max(1, Math.floor(rl.qps_limit * rl.burst_multiplier));
      if (this.bucket === null) this.bucket = new TokenBucket(rl.qps_limit, capacity);
      else this.bucket.reconfigure(rl.qps_limit, capacity);
    } else this.bucket = null;
    this.maxDurationMs = rl?.max_query_duration !== undefined ? rl.max_query_duration * 1000 : null;
    this.maxResultBytes = rl?.max_result_size ?? null;
    this.maxRows = rl?.max_rows_per_query ?? null;
    this.maxClients = rl?.max_connections ?? null;
    this.readOnly = perms?.read_only ?? false;
    this.checksStatements = this.schema !== null || perms !== null || this.bucket !== null;
    this.countsResults = this.maxResultBytes !== null || this.maxRows !== null;
  }

  get paused(): boolean {
    return this.pauseWaiters !== null;
  }

  pause(): void {
    this.pauseWaiters ??= [];
  }

  resume(): void {
    const waiters = this.pauseWaiters;
    this.pauseWaiters = null;
    for (const w of waiters ?? []) w();
  }

  /** Resolves when the tenant is not paused (at once when it is not). */
  whenResumed(): Promise<void> {
    const waiters = this.pauseWaiters;
    if (waiters === null) return Promise.resolve();
    return new Promise((resolve) => waiters.push(resolve));
  }

  /** Identifies whose session state a backend connection carries; unknown tenants never share with known ones. */
  get ownerKey(): string {
    return this.origin === 'passthrough' ? `\0passthrough:${this.database}` : this.id;
  }

  get maxBackends(): number {
    return this.pool.max_connections;
  }

  static fromConfig(t: TenantConfig): Tenant {
    return new Tenant(t.id, t.name ?? t.id, t, 'configured');
  }
}

export interface Identity {
  tenant: Tenant;
  role: string;
  /** The user name exactly as the client sent it (PostgreSQL's messages use it). */
  clientUser: string;
}

/** Why a connection was refused, as the FATAL the client will get. */
export class IdentifyError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly detail?: string,
  ) {
    super(message);
  }
}

export class TenantRegistry {
  private readonly byId = new Map<string, Tenant>();
  /** Database name → tenant, only for names that identify exactly one tenant. */
  private readonly byDatabase = new Map<string, Tenant>();
  private readonly ambiguousDatabases = new Set<string>();
  private readonly passthrough = new Map<string, Tenant>();

  constructor(private config: Config['multi_tenancy']) {
    for (const t of config.tenants) this.add(Tenant.fromConfig(t));
  }

  private add(t: Tenant): void {
    this.byId.set(t.id, t);
    for (const name of t.databaseNames) {
      if (this.ambiguousDatabases.has(name)) continue;
      const other = this.byDatabase.get(name);
      if (other !== undefined && other !== t) {
        this.byDatabase.delete(name);
        this.ambiguousDatabases.add(name);
      } else this.byDatabase.set(name, t);
    }
  }

  get(id: string): Tenant | undefined {
    return this.byId.get(id);
  }

  all(): Tenant[] {
    return [...this.byId.values()];
  }

  /** Configured and auto-created tenants, plus the pseudo-tenants of connections let through unidentified. */
  allWithPassthrough(): Tenant[] {
    return [...this.byId.values(), ...this.passthrough.values()];
  }

  /**
   * Applies a reloaded [multi_tenancy]: new tenants are added, existing ones reconfigured (limits,
   * permissions, pool caps), removed ones marked. A tenant whose isolation changed keeps its old one
   * (it cannot change under open sessions); its key is returned as needing a restart.
   */
  reconfigure(next: Config['multi_tenancy']): { added: string[]; removed: string[]; changed: string[]; restartRequired: string[] } {
    const out = { added: [] as string[], removed: [] as string[], changed: [] as string[], restartRequired: [] as string[] };
    this.config = next;
    const seen = new Set<string>();
    next.tenants.forEach((tc, i) => {
      seen.add(tc.id);
      const existing = this.byId.get(tc.id);
      if (existing === undefined) {
        this.add(Tenant.fromConfig(tc));
        out.added.push(tc.id);
        return;
      }
      const probe = Tenant.fromConfig(tc);
      if (probe.strategy !== existing.strategy || probe.database !== existing.database || probe.schema !== existing.schema) {
        out.restartRequired.push(`multi_tenancy.tenants[${i}].isolation`);
      }
      existing.configure(tc);
      out.changed.push(tc.id);
    });
    for (const t of [...this.byId.values()]) {
      if (t.origin !== 'configured' || seen.has(t.id)) continue;
      t.removed = true;
      this.byId.delete(t.id);
      out.removed.push(t.id);
    }
    if (out.removed.length > 0) this.rebuildDatabaseMap();
    return out;
  }

  private rebuildDatabaseMap(): void {
    this.byDatabase.clear();
    this.ambiguousDatabases.clear();
    const tenants = [...this.byId.values()];
    this.byId.clear();
    for (const t of tenants) this.add(t);
  }

  /** Maps a StartupMessage's user and database to a tenant, backend role and database, or throws IdentifyError. */
  identify(user: string, database: string | undefined): Identity {
    // libpq sends the user name as the database when none is given: that means "the tenant's database".
    const givenDb = database === undefined || database === '' || database === user ? undefined : database;
    const mt = this.config;
    if (!mt.enabled) return this.letThrough(user, user, givenDb);

    if (mt.identification.method === 'database_name') {
      if (givenDb === undefined) {
        throw new IdentifyError('28000', 'no database given: with database_name identification the database names the tenant');
      }
      const tenant = this.byDatabase.get(givenDb) ?? this.byId.get(givenDb);
      if (tenant !== undefined) return { tenant, role: user, clientUser: user };
      if (this.ambiguousDatabases.has(givenDb)) {
        throw new IdentifyError('28000', `database "${givenDb}" is shared by several tenants and does not identify one`, 'Connect with the tenant\'s own name, such as "<tenant>_db".');
      }
      return this.unknown(givenDb, user, user, givenDb);
    }

    const sep = mt.identification.separator;
    const at = user.indexOf(sep);
    if (at <= 0 || at + sep.length >= user.length) {
      if (mt.allow_unknown_tenants) return this.letThrough(user, user, givenDb);
      throw new IdentifyError('28000', `user "${user}" does not name a tenant`, `Expected "<tenant>${sep}<role>", for example "acme${sep}appuser".`);
    }
    const tenantId = user.slice(0, at);
    const role = user.slice(at + sep.length);
    const tenant = this.byId.get(tenantId);
    if (tenant === undefined) return this.unknown(tenantId, role, user, givenDb);
    this.checkDatabase(tenant, givenDb);
    return { tenant, role, clientUser: user };
  }

  /**
   * A tenant named by a verified token or an authorized HTTP request. Unknown ids are created when
   * auto_create_tenants says so, and refused otherwise (never let through unisolated).
   */
  identifyTenant(tenantId: string, role: string, clientUser: string, givenDb: string | undefined): Identity {
    const tenant = this.byId.get(tenantId);
    if (tenant === undefined) {
      const created = this.config.auto_create_tenants ? this.unknown(tenantId, role, clientUser, givenDb) : null;
      if (created !== null && created.tenant.origin === 'auto') return created;
      throw new IdentifyError('28000', `unknown tenant "${tenantId}"`);
    }
    this.checkDatabase(tenant, givenDb);
    return { tenant, role, clientUser };
  }

  private checkDatabase(tenant: Tenant, givenDb: string | undefined): void {
    if (givenDb === undefined || tenant.databaseNames.includes(givenDb)) return;
    throw new IdentifyError('42501', `permission denied for database "${givenDb}"`, `Tenant "${tenant.id}" uses database "${tenant.database}".`);
  }

  /** An id no configured tenant has: create it, let it through, or refuse, as multi_tenancy says. */
  private unknown(tenantId: string, role: string, clientUser: string, givenDb: string | undefined): Identity {
    const mt = this.config;
    if (mt.auto_create_tenants && mt.defaults?.isolation !== undefined && /^[A-Za-z0-9_][A-Za-z0-9_$-]{0,62}$/.test(tenantId)) {
      this.checkCapacity(tenantId);
      // Not registered yet: only a client that also authenticates may create a tenant (see confirm()).
      const tenant = fromDefaults(tenantId, mt.defaults);
      this.checkDatabase(tenant, givenDb);
      return { tenant, role, clientUser };
    }
    if (mt.allow_unknown_tenants) return this.letThrough(role, clientUser, givenDb);
    throw new IdentifyError('28000', `unknown tenant "${tenantId}"`);
  }

  private checkCapacity(tenantId: string): void {
    if (this.byId.size >= this.config.max_tenants) {
      throw new IdentifyError('53300', `cannot create tenant "${tenantId}": max_tenants (${this.config.max_tenants}) reached`);
    }
  }

  /**
   * Registers an auto-created tenant once its first client has authenticated, so unauthenticated
   * connections cannot use up max_tenants. Returns the registered tenant (another client may have created
   * it meanwhile); counters the unregistered object gathered during login move over.
   */
  confirm(tenant: Tenant): Tenant {
    if (tenant.origin !== 'auto') return tenant;
    const existing = this.byId.get(tenant.id);
    if (existing === tenant) return tenant;
    if (existing !== undefined) {
      existing.backendsInUse += tenant.backendsInUse;
      tenant.backendsInUse = 0;
      return existing;
    }
    this.checkCapacity(tenant.id);
    this.add(tenant);
    return tenant;
  }

  /** No tenant isolation: the role and database go to the backend as given. */
  private letThrough(role: string, clientUser: string, givenDb: string | undefined): Identity {
    const database = givenDb ?? role;
    let tenant = this.passthrough.get(database);
    if (tenant === undefined) {
      const d = this.config.defaults;
      tenant = new Tenant(
        '(unknown)',
        'unidentified connections',
        { isolation: { strategy: 'database', database_name: database }, pool: d?.pool ?? { max_connections: 20, dedicated_pool: false }, rate_limits: d?.rate_limits, permissions: d?.permissions },
        'passthrough',
      );
      this.passthrough.set(database, tenant);
    }
    return { tenant, role, clientUser };
  }
}

function fromDefaults(id: string, d: TenantDefaults): Tenant {
  return new Tenant(id, id, { ...d, isolation: d.isolation! }, 'auto');
}
