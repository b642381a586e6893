// bench/report.ts — turns benchmark results into the side-by-side console table, the added-latency
// summary and the JSON files under .bench/.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TargetId } from './targets.js';

export type Mode = 'simple' | 'extended' | 'prepared';

export interface Result {
  target: TargetId; mode: Mode; clients: number;
  tps?: number; latencyMs?: number; error?: string;
  /** CPU time (user + system) the pooler process spent per transaction, µs; logins included. */
  cpuUsPerTx?: number;
}

export interface Report {
  date: string; gitCommit: string | null; node: string; postgres: string; pgbouncer: string | null; pgbench: string;
  cpus: number; seconds: number; scale: number; modes: Mode[]; clients: number[]; targets: TargetId[];
  proxyLimits: 'reference' | 'raised' | null;
  /** How PgBouncer and the proxy reach PostgreSQL (BENCH_BACKEND). */
  backend: 'tcp' | 'unix';
  skipped: Partial<Record<TargetId, string>>; results: Result[];
}

/** A table column: heading and the cell for (mode, clients). */
type Col = [string, (m: Mode, c: number) => string];

const SHORT: Record<TargetId, string> = { direct: 'direct', pgbouncer: 'pgbouncer', 'proxy-tx': 'proxy-tx', 'proxy-tx-node': 'proxy-node', 'proxy-tx-bare': 'proxy-bare', 'proxy-session': 'proxy-sess' };

export function printReport(r: Report): void {
  const find = (t: TargetId, m: Mode, c: number): Result | undefined =>
    r.results.find((x) => x.target === t && x.mode === m && x.clients === c);
  const ran = r.targets.filter((t) => r.results.some((x) => x.target === t));
  const has = (t: TargetId): boolean => ran.includes(t);
  const tps = (x?: Result): string => (x === undefined ? '-' : x.tps === undefined ? 'ERR' : x.tps.toFixed(0));
  const lat = (x?: Result): string => (x === undefined ? '-' : x.latencyMs === undefined ? 'ERR' : x.latencyMs.toFixed(3));
  const ratio = (a?: Result, b?: Result): string =>
    a?.tps !== undefined && b?.tps !== undefined && b.tps > 0 ? (a.tps / b.tps).toFixed(2) : '-';

  const table = (title: string, cols: Col[]): void => {
    const all: Col[] = [['mode', (m) => m], ['clients', (_m, c) => String(c)], ...cols];
    const rows = r.modes.flatMap((m) => r.clients.map((c) => all.map(([, cell]) => cell(m, c))));
    const widths = all.map(([head], i) => Math.max(head.length, ...rows.map((row) => row[i]?.length ?? 0)));
    const line = (cells: string[]): string =>
      cells.map((s, i) => (i < 2 ? s.padEnd(widths[i] ?? 0) : s.padStart(widths[i] ?? 0))).join('  ').trimEnd();
    console.log(`\n${title}`);
    console.log(line(all.map(([head]) => head)));
    console.log(widths.map((w) => '-'.repeat(w)).join('  '));
    for (const row of rows) console.log(line(row));
  };
  const ratios: Array<[TargetId, TargetId]> = [['proxy-tx', 'direct'], ['proxy-tx', 'pgbouncer'], ['proxy-tx-node', 'pgbouncer'], ['proxy-tx', 'proxy-tx-node'], ['proxy-tx', 'proxy-tx-bare'], ['proxy-session', 'direct']];
  console.log(`\npgbench -S (select-only), scale ${r.scale}, ${r.seconds} s per run, ${r.cpus} CPUs`);
  table('Throughput (tps, without initial connection time)', [
    ...ran.map((t): Col => [SHORT[t], (m, c) => tps(find(t, m, c))]),
    ...ratios.filter(([a, b]) => has(a) && has(b))
      .map(([a, b]): Col => [`${SHORT[a]}/${SHORT[b]}`, (m, c) => ratio(find(a, m, c), find(b, m, c))]),
  ]);
  table('Average latency (ms)', ran.map((t): Col => [SHORT[t], (m, c) => lat(find(t, m, c))]));
  // On a machine whose cores pgbench, PostgreSQL and the pooler share, a pooler's CPU per transaction is
  // what its throughput comes down to, and it varies far less from run to run than tps does.
  const pooled = ran.filter((t) => r.results.some((x) => x.target === t && x.cpuUsPerTx !== undefined));
  if (pooled.length > 0) {
    const cpu = (x?: Result): string => (x?.cpuUsPerTx === undefined ? '-' : x.cpuUsPerTx.toFixed(1));
    table('Pooler CPU per transaction (µs, user + system, logins included)', [
      ...pooled.map((t): Col => [SHORT[t], (m, c) => cpu(find(t, m, c))]),
      ...(pooled.includes('proxy-tx') && pooled.includes('pgbouncer')
        ? [['proxy-tx/pgbouncer', (m: Mode, c: number) => {
            const a = find('proxy-tx', m, c)?.cpuUsPerTx;
            const b = find('pgbouncer', m, c)?.cpuUsPerTx;
            return a !== undefined && b !== undefined && b > 0 ? (a / b).toFixed(2) : '-';
          }] satisfies Col]
        : []),
    ]);
  }

  if (r.clients.includes(1) && has('direct')) {
    const others = ran.filter((t) => t !== 'direct');
    if (others.length > 0) {
      console.log('\nAdded latency per query at 1 client (target avg latency − direct avg latency, ms):');
      for (const m of r.modes) {
        const d = find('direct', m, 1)?.latencyMs;
        const parts = others.map((t) => {
          const x = find(t, m, 1)?.latencyMs;
          return `${SHORT[t]} ${x === undefined || d === undefined ? 'n/a' : (x - d >= 0 ? '+' : '') + (x - d).toFixed(3)}`;
        });
        console.log(`  ${m.padEnd(8)}  ${parts.join('   ')}`);
      }
    }
  }

  const errors = r.results.filter((x) => x.error !== undefined);
  if (errors.length > 0) {
    console.log('\nFailed runs:');
    const groups = new Map<string, { target: TargetId; error: string; runs: string[] }>();
    for (const e of errors) {
      const key = `${e.target}\0${e.error}`;
      const g = groups.get(key) ?? { target: e.target, error: e.error ?? '', runs: [] };
      g.runs.push(`${e.mode}/${e.clients}`);
      groups.set(key, g);
    }
    for (const g of groups.values()) console.log(`  ${g.target} [${g.runs.join(' ')}]: ${g.error}`);
    if (errors.some((e) => e.target === 'pgbouncer' && e.mode === 'prepared')) {
      console.log('  (PgBouncer before 1.21 cannot keep protocol-level prepared statements in transaction pooling.)');
    }
  }
  for (const [t, why] of Object.entries(r.skipped)) console.log(`\nSkipped ${t}: ${why}`);
}

export function writeReport(repoRoot: string, r: Report): string {
  const dir = join(repoRoot, '.bench');
  mkdirSync(dir, { recursive: true });
  const json = JSON.stringify(r, null, 2) + '\n';
  const file = join(dir, `results-${r.date.replace(/[:.]/g, '-')}.json`);
  writeFileSync(file, json);
  writeFileSync(join(dir, 'latest.json'), json);
  return file;
}
