// pool/ owns backend connections. A Pool holds connections to one (database, role) and hands them out
// FIFO; a PoolGroup caps several pools together (the shared pool, or one tenant's dedicated pool); the
// tenant's own backend cap applies in either. Waiters are served in order, skipping any whose tenant is at
// its cap so one busy tenant cannot block the others.
import type { Secret } from '../auth/credentials.js';
import { turnNow } from '../io/native-socket.js';
import type { Tenant } from '../tenancy/registry.js';
import { BackendUnavailable, ServerConnection, type BackendTarget } from './server-connection.js';

export interface PoolLimits {
  maxSize: number;
  minIdle: number;
  idleTimeoutMs: number;
  maxLifetimeMs: number;
  acquireTimeoutMs: number;
  testOnAcquire: boolean;
}

/** A connection idle at least this long is tested before reuse (PgBouncer's server_check_delay). */
const TEST_AFTER_IDLE_MS = 1000;
const CONNECT_TIMEOUT_MS = 10_000;

export class AcquireTimeout extends Error {}

export class PoolGroup {
  readonly pools = new Set<Pool>();
  constructor(
    readonly name: string,
    public max: number,
  ) {}

  get size(): number {
    let n = 0;
    for (const p of this.pools) n += p.size;
    return n;
  }

  /** Room for one more connection: close an idle one in another pool of the group when the group is full. */
  makeRoom(except: Pool): boolean {
    if (this.size < this.max) return true;
    for (const p of this.pools) {
      if (p !== except && p.closeOneIdle()) return true;
    }
    return false;
  }

  pumpAll(): void {
    for (const p of this.pools) p.pump();
  }
}

interface Waiter {
  tenant: Tenant;
  /** Needs a brand-new connection made with `secret` (a cleartext password the backend has to judge). */
  fresh: Secret | null;
  resolve: (c: ServerConnection) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class Pool {
  /** Idle connections, most recently released last. */
  readonly idle: ServerConnection[] = [];
  readonly busy = new Set<ServerConnection>();
  private connecting = 0;
  private waiters: Waiter[] = [];
  closed = false;

  constructor(
    readonly name: string,
    readonly target: BackendTarget,
    public limits: PoolLimits,
    readonly group: PoolGroup,
    /** The secret new connections log in with, once a client has taught the proxy one. */
    private readonly secret: () => Secret | null,
  ) {
    group.pools.add(this);
  }

  get size(): number {
    return this.idle.length + this.busy.size + this.connecting;
  }

  get waiting(): number {
    return this.waiters.length;
  }

  /**
   * Checks a connection out for `tenant`, preferring one that already carries that tenant's session state.
   * With `fresh`, always opens a new connection with that secret (how a cleartext password gets verified).
   */
  async acquire(tenant: Tenant, fresh: Secret | null = null): Promise<ServerConnection> {
    for (;;) {
      const conn = await new Promise<ServerConnection>((resolve, reject) => {
        const timer = setTimeout(() => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(
            new AcquireTimeout(
              `timed out after ${this.limits.acquireTimeoutMs / 1000} s waiting for a backend connection (${this.name}: ${this.size}/${this.limits.maxSize} in use, ${this.group.name} ${this.group.size}/${this.group.max}, tenant "${tenant.id}" ${tenant.backendsInUse}/${tenant.maxBackends})`,
            ),
          );
        }, this.limits.acquireTimeoutMs);
        const w: Waiter = { tenant, fresh, resolve, reject, timer };
        this.waiters.push(w);
        this.pump();
      });
      if (fresh !== null || !this.limits.testOnAcquire || turnNow() - conn.lastUsedAt < TEST_AFTER_IDLE_MS) return conn;
      try {
        await conn.run(['']);
        return conn;
      } catch {
        this.release(conn, false, tenant);
      }
    }
  }

  /**
   * The hot path of transaction pooling: an idle connection handed over synchronously, with no promise or
   * timer, when nobody is queued ahead and no test is due. Null means "use acquire()".
   */
  tryTake(tenant: Tenant): ServerConnection | null {
    if (this.waiters.length > 0 || this.idle.length === 0 || tenant.backendsInUse >= tenant.maxBackends) return null;
    const now = turnNow();
    const conn = this.takeIdle(tenant.ownerKey, now);
    if (conn === undefined) return null;
    if (this.limits.testOnAcquire && now - conn.lastUsedAt >= TEST_AFTER_IDLE_MS) {
      this.idle.push(conn);
      return null;
    }
    tenant.backendsInUse++;
    this.busy.add(conn);
    return conn;
  }

  private pumping = false;
  private pumpAgain = false;

  /**
   * Serves waiters in FIFO order as far as idle connections and caps allow. Closing an idle connection to
   * make room fires close listeners that pump again: re-entry is deferred to a second pass, never nested.
   */
  pump(): void {
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    this.pumping = true;
    try {
      do {
        this.pumpAgain = false;
        this.pumpOnce();
      } while (this.pumpAgain);
    } finally {
      this.pumping = false;
    }
  }

  private pumpOnce(): void {
    for (let i = 0; i < this.waiters.length; ) {
      const w = this.waiters[i]!;
      if (w.tenant.backendsInUse >= w.tenant.maxBackends) {
        i++;
        continue;
      }
      let conn: ServerConnection | undefined;
      if (w.fresh === null && this.idle.length > 0) conn = this.takeIdle(w.tenant.ownerKey, turnNow());
      if (conn !== undefined) {
        this.waiters.splice(i, 1);
        this.handOut(w, conn);
        continue;
      }
      const canGrow = this.size < this.limits.maxSize && this.group.makeRoom(this);
      if (!canGrow && !(w.fresh !== null && this.closeOneIdle())) {
        i++;
        continue;
      }
      const secret = w.fresh ?? this.secret();
      if (secret === null) {
        // Nobody has logged in as this role yet: the proxy has nothing to log in with.
        this.waiters.splice(i, 1);
        clearTimeout(w.timer);
        w.reject(new BackendUnavailable(`no credentials known yet for role "${this.target.role}"`));
        continue;
      }
      this.waiters.splice(i, 1);
      w.tenant.backendsInUse++;
      this.connecting++;
      ServerConnection.connect(this.target, secret, CONNECT_TIMEOUT_MS).then(
        (c) => {
          this.connecting--;
          clearTimeout(w.timer);
          if (this.closed) {
            c.close();
            w.tenant.backendsInUse--;
            w.reject(new BackendUnavailable('pool is shutting down'));
            return;
          }
          this.adopt(c);
          this.busy.add(c);
          w.resolve(c);
        },
        (err: Error) => {
          this.connecting--;
          w.tenant.backendsInUse--;
          clearTimeout(w.timer);
          w.reject(err);
          this.group.pumpAll();
        },
      );
    }
  }

  private handOut(w: Waiter, conn: ServerConnection): void {
    clearTimeout(w.timer);
    w.tenant.backendsInUse++;
    this.busy.add(conn);
    w.resolve(conn);
  }

  /** Most recently used first, preferring one that already carries the tenant; too-old ones are closed. */
  private takeIdle(ownerKey: string, now: number): ServerConnection | undefined {
    let fallback = -1;
    for (let i = this.idle.length - 1; i >= 0; i--) {
      const c = this.idle[i]!;
      if (now - c.createdAt >= this.limits.maxLifetimeMs) {
        this.idle.splice(i, 1);
        c.close();
        if (fallback > i) fallback--;
        continue;
      }
      if (c.owner === ownerKey) return i === this.idle.length - 1 ? this.idle.pop() : this.idle.splice(i, 1)[0];
      if (fallback < 0) fallback = i;
    }
    return fallback < 0 ? undefined : this.idle.splice(fallback, 1)[0];
  }

  private adopt(c: ServerConnection): void {
    c.onClose(() => {
      const i = this.idle.indexOf(c);
      if (i >= 0) this.idle.splice(i, 1);
      // A busy connection that dies stays counted until its session releases it.
      this.group.pumpAll();
    });
  }

  /**
   * Returns a connection. `reusable` is false when it may carry an open transaction, unread results or
   * state that cannot be reset: it is closed instead of pooled.
   */
  release(conn: ServerConnection, reusable: boolean, tenant?: Tenant): void {
    if (!this.busy.delete(conn)) return;
    if (tenant !== undefined) tenant.backendsInUse--;
    const now = turnNow();
    const expired = now - conn.createdAt >= this.limits.maxLifetimeMs;
    // After a reload shrank the pool or its group, a returning connection above the cap closes.
    const surplus = this.size >= this.limits.maxSize || this.group.size >= this.group.max;
    if (!reusable || conn.closed || conn.txStatus !== 'I' || expired || this.closed || surplus) conn.close();
    else {
      conn.lastUsedAt = now;
      this.idle.push(conn);
    }
    this.group.pumpAll();
  }

  /** Closes idle connections above the (possibly just lowered) caps. */
  trimToLimits(): void {
    while (this.idle.length > 0 && (this.size > this.limits.maxSize || this.group.size > this.group.max)) this.closeOneIdle();
  }

  closeOneIdle(): boolean {
    const c = this.idle.shift();
    if (c === undefined) return false;
    c.close();
    return true;
  }

  /** Periodic upkeep: close idle-too-long and too-old connections, keep min_idle warm. */
  maintain(now: number): void {
    for (let i = 0; i < this.idle.length; ) {
      const c = this.idle[i]!;
      const tooOld = now - c.createdAt >= this.limits.maxLifetimeMs;
      const idleTooLong = this.limits.idleTimeoutMs > 0 && now - c.lastUsedAt >= this.limits.idleTimeoutMs && this.idle.length > this.limits.minIdle;
      if (tooOld || idleTooLong) {
        this.idle.splice(i, 1);
        c.close();
      } else i++;
    }
    const secret = this.secret();
    while (secret !== null && !this.closed && this.idle.length + this.connecting < this.limits.minIdle && this.size < this.limits.maxSize && this.group.size < this.group.max) {
      this.connecting++;
      ServerConnection.connect(this.target, secret, CONNECT_TIMEOUT_MS).then(
        (c) => {
          this.connecting--;
          if (this.closed) {
            c.close();
            return;
          }
          this.adopt(c);
          this.idle.unshift(c);
          this.pump();
        },
        () => {
          this.connecting--;
        },
      );
    }
  }

  /** Closes idle connections and refuses new work; busy ones close as their sessions release them. */
  shutdown(): void {
    this.closed = true;
    for (const c of this.idle.splice(0)) c.close();
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(new BackendUnavailable('pool is shutting down'));
    }
    this.group.pools.delete(this);
  }

  stats(): { name: string; database: string; role: string; idle: number; active: number; connecting: number; waiting: number; max: number } {
    return {
      name: this.name,
      database: this.target.database,
      role: this.target.role,
      idle: this.idle.length,
      active: this.busy.size,
      connecting: this.connecting,
      waiting: this.waiters.length,
      max: this.limits.maxSize,
    };
  }
}
