// admin/ owns what operators can see. This file is the metrics model: per-tenant counters live as plain
// numbers on each Tenant (the hot path only increments them) and are read into prom-client at scrape
// time; query latency is a prom-client histogram whose per-tenant child is cached on the Tenant.
// Label cardinality is bounded by the tenants that exist (configured plus auto-created, under max_tenants).
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { PoolManager } from '../pool/manager.js';
import type { RejectionReason, Tenant } from '../tenancy/registry.js';

/** Seconds; from sub-millisecond proxy hops to the longest max_query_duration anyone sets. */
const LATENCY_BUCKETS = [0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export const REJECTION_REASONS: RejectionReason[] = ['rate_limit', 'permission', 'isolation', 'connection_cap', 'duration', 'result_size', 'rows', 'too_long'];

interface Rates {
  lastQueries: number;
  lastAt: number;
  qps: number;
}

/** Gauges sum per label value: connections let through unidentified are one "(unknown)" pseudo-tenant per database. */
function sumById(tenants: Tenant[], read: (t: Tenant) => number): Map<string, number> {
  const out = new Map<string, number>();
  for (const t of tenants) out.set(t.id, (out.get(t.id) ?? 0) + read(t));
  return out;
}

export interface LatencySummary {
  count: number;
  p50_ms: number | null;
  p95_ms: number | null;
  p99_ms: number | null;
}

export class ProxyMetrics {
  readonly registry = new Registry();
  readonly latency: Histogram<'tenant'>;
  private readonly rates = new WeakMap<Tenant, Rates>();
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly tenants: () => Tenant[],
    poolManager: () => PoolManager,
    clientCount: () => number,
  ) {
    const reg = this.registry;
    collectDefaultMetrics({ register: reg, prefix: 'heliosproxy_' });
    this.latency = new Histogram({
      name: 'heliosproxy_query_duration_seconds',
      help: 'Time from a request reaching the backend to its ReadyForQuery, per tenant',
      labelNames: ['tenant'],
      buckets: LATENCY_BUCKETS,
      registers: [reg],
    });
    const perTenant = (name: string, help: string, read: (t: Tenant) => number): void => {
      const list = this.tenants;
      new Counter({
        name,
        help,
        labelNames: ['tenant'],
        registers: [reg],
        collect() {
          this.reset();
          for (const t of list()) this.inc({ tenant: t.id }, read(t));
        },
      });
    };
    perTenant('heliosproxy_queries_total', 'Statements forwarded (simple-protocol statements and Executes)', (t) => t.stats.queries);
    perTenant('heliosproxy_errors_total', 'Errors returned to clients: the backend\'s, and statements the proxy cut short (duration, result limits); refusals are counted in heliosproxy_rejections_total', (t) => t.stats.errors);
    perTenant('heliosproxy_rows_total', 'Result rows returned', (t) => t.stats.rows);
    perTenant('heliosproxy_result_bytes_total', 'Result bytes returned (DataRow and CopyData messages)', (t) => t.stats.bytes);
    const list = this.tenants;
    new Counter({
      name: 'heliosproxy_rejections_total',
      help: 'Statements and connections refused by the proxy, by reason',
      labelNames: ['tenant', 'reason'],
      registers: [reg],
      collect() {
        this.reset();
        for (const t of list()) for (const r of REJECTION_REASONS) this.inc({ tenant: t.id, reason: r }, t.stats.rejections[r]);
      },
    });
    const rates = (t: Tenant): number => this.rateOf(t);
    new Gauge({
      name: 'heliosproxy_tenant_qps',
      help: 'Statements per second over the last second',
      labelNames: ['tenant'],
      registers: [reg],
      collect() {
        this.reset();
        for (const [tenant, v] of sumById(list(), rates)) this.set({ tenant }, v);
      },
    });
    new Gauge({
      name: 'heliosproxy_tenant_bucket_tokens',
      help: 'Tokens left in the tenant\'s QPS bucket',
      labelNames: ['tenant'],
      registers: [reg],
      collect() {
        this.reset();
        for (const [tenant, v] of sumById(list().filter((t) => t.bucket !== null), (t) => t.bucket!.level)) this.set({ tenant }, v);
      },
    });
    new Gauge({
      name: 'heliosproxy_tenant_clients',
      help: 'Client connections per tenant',
      labelNames: ['tenant'],
      registers: [reg],
      collect() {
        this.reset();
        for (const [tenant, v] of sumById(list(), (t) => t.clients)) this.set({ tenant }, v);
      },
    });
    new Gauge({
      name: 'heliosproxy_tenant_backends_in_use',
      help: 'Backend connections a tenant holds right now',
      labelNames: ['tenant'],
      registers: [reg],
      collect() {
        this.reset();
        for (const [tenant, v] of sumById(list(), (t) => t.backendsInUse)) this.set({ tenant }, v);
      },
    });
    const pools = poolManager;
    new Gauge({
      name: 'heliosproxy_pool_connections',
      help: 'Backend connections per pool and state (active, idle, connecting) and clients waiting',
      labelNames: ['pool', 'state'],
      registers: [reg],
      collect() {
        this.reset();
        for (const p of pools().all()) {
          const s = p.stats();
          this.set({ pool: s.name, state: 'active' }, s.active);
          this.set({ pool: s.name, state: 'idle' }, s.idle);
          this.set({ pool: s.name, state: 'connecting' }, s.connecting);
          this.set({ pool: s.name, state: 'waiting' }, s.waiting);
        }
      },
    });
    const clients = clientCount;
    new Gauge({
      name: 'heliosproxy_clients',
      help: 'Client connections',
      registers: [reg],
      collect() {
        this.set(clients());
      },
    });
    this.timer = setInterval(() => this.sampleRates(), 1000);
    this.timer.unref();
  }

  /** The latency histogram's child for a tenant (cached on the tenant: no label lookup per request). */
  latencyOf(tenant: Tenant): { observe(seconds: number): void } {
    tenant.latency ??= this.latency.labels({ tenant: tenant.id });
    return tenant.latency;
  }

  private sampleRates(): void {
    const now = Date.now();
    for (const t of this.tenants()) {
      const r = this.rates.get(t);
      if (r === undefined) this.rates.set(t, { lastQueries: t.stats.queries, lastAt: now, qps: 0 });
      else {
        r.qps = ((t.stats.queries - r.lastQueries) * 1000) / Math.max(1, now - r.lastAt);
        r.lastQueries = t.stats.queries;
        r.lastAt = now;
      }
    }
  }

  rateOf(t: Tenant): number {
    return Math.round((this.rates.get(t)?.qps ?? 0) * 10) / 10;
  }

  /** p50/p95/p99 estimated from the histogram's buckets (linear within a bucket, as Prometheus does). */
  async latencySummary(tenant: string | null): Promise<LatencySummary> {
    const m = await this.latency.get();
    const buckets = new Map<number, number>();
    let count = 0;
    for (const v of m.values) {
      const labels = v.labels as Partial<Record<'tenant' | 'le', string | number>>;
      if (tenant !== null && labels.tenant !== tenant) continue;
      if (v.metricName === 'heliosproxy_query_duration_seconds_bucket') {
        const le = labels.le === '+Inf' ? Infinity : Number(labels.le);
        buckets.set(le, (buckets.get(le) ?? 0) + v.value);
      } else if (v.metricName === 'heliosproxy_query_duration_seconds_count') count += v.value;
    }
    const sorted = [...buckets.entries()].sort((a, b) => a[0] - b[0]);
    const quantile = (q: number): number | null => {
      if (count === 0) return null;
      const rank = q * count;
      let prevLe = 0;
      let prevCount = 0;
      for (const [le, c] of sorted) {
        if (c >= rank) {
          if (le === Infinity) return Math.round(prevLe * 1e6) / 1e3;
          const within = c === prevCount ? 0 : (rank - prevCount) / (c - prevCount);
          return Math.round((prevLe + (le - prevLe) * within) * 1e6) / 1e3;
        }
        prevLe = le;
        prevCount = c;
      }
      return null;
    };
    return { count, p50_ms: quantile(0.5), p95_ms: quantile(0.95), p99_ms: quantile(0.99) };
  }

  close(): void {
    clearInterval(this.timer);
  }
}
