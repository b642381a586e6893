// bench/run.ts — `npm run bench`: pgbench -S against PostgreSQL directly, PgBouncer and heliosproxy
// (transaction and session pooling) on one throwaway cluster, printed side by side and saved to .bench/.
// Env: BENCH_TARGETS (direct,pgbouncer,proxy-tx,proxy-tx-node,proxy-tx-bare,proxy-session | proxy); proxy-tx-node relays on Node's
// sockets instead of the native layer, proxy-tx-bare has no rate_limits/permissions, BENCH_MODES (simple,extended,prepared),
// BENCH_CLIENTS (1,20,100), BENCH_SECONDS (10), BENCH_REFERENCE_LIMITS=1 (keep acme's 1000 qps / 50 conn
// limits from the reference config), BENCH_VERBOSE=1 (PostgreSQL log lines), BENCH_BACKEND=unix (PgBouncer and the
// proxy reach PostgreSQL over its Unix-domain socket instead of TCP; clients always use TCP).
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { seedScenario, startLocalPostgres } from '../src/localpg/index.js';
import { cpuMs, killInFlight, run } from './proc.js';
import { printReport, writeReport, type Mode, type Report, type Result } from './report.js';
import {
  TARGET_IDS, findPgBouncer, pgbouncerTarget, pgbouncerVersion, proxyConfig, proxyTarget, type Running, type Target, type TargetId,
} from './targets.js';

const repoRoot = dirname(dirname(fileURLToPath(import.meta.url)));
const SCALE = 10;
const PASSWORD = 'apppass';

// ── settings ───────────────────────────────────────────────────────────────────────────────────
const MODES: readonly Mode[] = ['simple', 'extended', 'prepared'];
const ALIASES: Record<string, TargetId[]> = { proxy: ['proxy-tx', 'proxy-tx-node', 'proxy-tx-bare', 'proxy-session'], 'proxy-transaction': ['proxy-tx'] };

function fail(msg: string): never { throw new Error(msg); }
function list(name: string, fallback: string): string[] {
  return (process.env[name] ?? fallback).split(',').map((s) => s.trim()).filter((s) => s !== '');
}

function readSettings(): { seconds: number; clients: number[]; modes: Mode[]; targets: TargetId[]; referenceLimits: boolean; verbose: boolean; backend: 'tcp' | 'unix' } {
  const seconds = Number(process.env.BENCH_SECONDS ?? '10');
  if (!Number.isInteger(seconds) || seconds < 1) fail(`BENCH_SECONDS must be a positive integer, got "${process.env.BENCH_SECONDS}"`);
  const clients = list('BENCH_CLIENTS', '1,20,100').map((s) =>
    Number.isInteger(Number(s)) && Number(s) > 0 ? Number(s) : fail(`BENCH_CLIENTS: "${s}" is not a positive integer`));
  const modes = list('BENCH_MODES', MODES.join(',')).map((s) =>
    (MODES as readonly string[]).includes(s) ? (s as Mode) : fail(`BENCH_MODES: unknown mode "${s}" (use ${MODES.join(', ')})`));
  const targets = [...new Set(list('BENCH_TARGETS', TARGET_IDS.join(',')).flatMap((s) =>
    ALIASES[s] ?? ((TARGET_IDS as readonly string[]).includes(s) ? [s as TargetId]
      : fail(`BENCH_TARGETS: unknown target "${s}" (use ${TARGET_IDS.join(', ')}, proxy)`))))];
  const backend = process.env.BENCH_BACKEND ?? 'tcp';
  if (backend !== 'tcp' && backend !== 'unix') fail(`BENCH_BACKEND must be tcp or unix, got "${backend}"`);
  return { seconds, clients, modes, targets, referenceLimits: process.env.BENCH_REFERENCE_LIMITS === '1', verbose: process.env.BENCH_VERBOSE === '1', backend };
}

// ── cleanup on success, failure and Ctrl-C ───────────────────────────────────────────────────────
const cleanups = new Map<number, () => Promise<void>>();
let nextCleanup = 0;
/** Registers `fn` for cleanup; the returned function runs it now (once) and unregisters it. */
function defer(fn: () => Promise<void>): () => Promise<void> {
  const id = nextCleanup++;
  cleanups.set(id, fn);
  return async () => { if (cleanups.delete(id)) await fn(); };
}
async function cleanupAll(): Promise<void> {
  for (const id of [...cleanups.keys()].reverse()) {
    const fn = cleanups.get(id);
    cleanups.delete(id);
    try { await fn?.(); } catch (e) { console.error(`cleanup: ${(e as Error).message}`); }
  }
}
let interrupted = false;
let interruptedAt = 0;
/** Called between steps: after a Ctrl-C, main stops instead of carrying on against torn-down targets. */
function checkInterrupted(): void { if (interrupted) throw new Error('interrupted'); }
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    // A terminal Ctrl-C reaches us directly and again relayed by npm/tsx: only a later one forces exit.
    if (interrupted) { if (Date.now() - interruptedAt > 2000) process.exit(130); return; }
    interrupted = true;
    interruptedAt = Date.now();
    console.error(`\n${sig}: stopping and cleaning up (again to force)…`);
    killInFlight();
    void cleanupAll().finally(() => process.exit(130));
  });
}

// ── pgbench ──────────────────────────────────────────────────────────────────────────────────────
let pgbench = 'pgbench';

function firstErrorLine(out: string): string | undefined {
  const lines = out.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  // Two pgbench threads can interleave their "pgbench: " prefixes on one line.
  return (lines.find((l) => /error|fatal|abort/i.test(l)) ?? lines[0])?.replace(/^(pgbench:\s*)+/, 'pgbench: ');
}

/** One pgbench run; with `pid`, also the CPU that process spent per transaction (µs, logins included). */
async function bench(port: number, user: string, mode: Mode, clients: number, secs: number, pid?: number): Promise<Pick<Result, 'tps' | 'latencyMs' | 'cpuUsPerTx' | 'error'>> {
  const args = ['-S', '-n', '-M', mode, '-c', String(clients), '-j', String(Math.min(clients, 2)), '-T', String(secs),
    '-h', '127.0.0.1', '-p', String(port), '-U', user, 'shared_db'];
  const cpuBefore = pid === undefined ? null : cpuMs(pid);
  const r = await run(pgbench, args, { env: { ...process.env, PGPASSWORD: PASSWORD }, timeoutMs: (secs + 60) * 1000 });
  const cpuAfter = pid === undefined ? null : cpuMs(pid);
  const all = r.stdout + r.stderr;
  const tps = /tps = ([\d.]+) \(without initial connection time\)/.exec(r.stdout)?.[1];
  const lat = /latency average = ([\d.]+) ms/.exec(r.stdout)?.[1];
  if (r.timedOut) return { error: `pgbench did not finish within ${secs + 60} s (killed)` };
  if (r.code !== 0 || /aborted/i.test(all) || tps === undefined || lat === undefined) {
    return { error: firstErrorLine(r.stderr) ?? firstErrorLine(r.stdout) ?? `pgbench exited with code ${r.code}` };
  }
  const txs = Number(/number of transactions actually processed: (\d+)/.exec(r.stdout)?.[1] ?? 0);
  const cpu = cpuBefore !== null && cpuAfter !== null && txs > 0 ? { cpuUsPerTx: ((cpuAfter - cpuBefore) * 1000) / txs } : {};
  return { tps: Number(tps), latencyMs: Number(lat), ...cpu };
}

// ── main ─────────────────────────────────────────────────────────────────────────────────────────
async function main(): Promise<void> {
  const started = new Date();
  const { seconds, clients: clientCounts, modes, targets: targetIds, referenceLimits, verbose, backend } = readSettings();
  console.log(`targets ${targetIds.join(', ')} × modes ${modes.join(', ')} × clients ${clientCounts.join(', ')} × ${seconds} s; poolers reach PostgreSQL over ${backend === 'unix' ? 'its Unix-domain socket' : 'TCP'}`);

  const proxies = targetIds.filter((t) => t.startsWith('proxy'));
  // Fail before the long set-up if the reference config is missing or no longer matches the rewrites.
  if (proxies.length > 0) proxyConfig(repoRoot, { listen: 1, admin: 2, pgPort: 3, session: true, referenceLimits, ...(backend === 'unix' ? { backendHost: '/tmp' } : {}) });

  console.log('starting throwaway PostgreSQL…');
  // Registered before it resolves, so a Ctrl-C during start-up still waits for the cluster and stops it.
  const starting = startLocalPostgres({ settings: { max_connections: '800' }, ...(verbose ? { log: (l: string) => console.log(`  pg| ${l}`) } : {}) });
  defer(async () => { await (await starting.catch(() => null))?.stop(); });
  const pg = await starting;
  if (existsSync(join(pg.binDir, 'pgbench'))) pgbench = join(pg.binDir, 'pgbench');
  checkInterrupted();
  console.log(`PostgreSQL ${pg.version} on 127.0.0.1:${pg.port}; seeding, pgbench -i -s ${SCALE} into shared_db.acme…`);
  await seedScenario(pg);
  const init = await run(pgbench, ['-i', '-s', String(SCALE), '-q', '-h', '127.0.0.1', '-p', String(pg.port), '-U', 'appuser', 'shared_db'],
    { env: { ...process.env, PGPASSWORD: PASSWORD, PGOPTIONS: '-c search_path=acme' } });
  checkInterrupted();
  if (init.code !== 0) fail(`pgbench -i failed (exit ${init.code}):\n${init.stderr.trim()}`);
  await pg.psql('ALTER ROLE appuser IN DATABASE shared_db SET search_path = acme');
  const backendHost = backend === 'unix' ? pg.socketDir : '127.0.0.1';

  const skipped: Report['skipped'] = {};
  const targets: Target[] = [];
  let bouncerVersion: string | null = null;
  for (const id of targetIds) {
    if (id === 'direct') targets.push({ id, user: 'appuser', start: async (): Promise<Running> => ({ port: pg.port, stop: async () => {} }) });
    else if (id === 'pgbouncer') {
      const bin = findPgBouncer();
      if (bin === null) {
        skipped.pgbouncer = 'PgBouncer not installed (apt-get install pgbouncer)';
        console.log(skipped.pgbouncer);
      } else {
        bouncerVersion = pgbouncerVersion(bin);
        targets.push(pgbouncerTarget(bin, pg.port, backendHost));
      }
    } else targets.push(proxyTarget(repoRoot, pg.port, backendHost, id, referenceLimits));
  }
  if (!referenceLimits && proxies.length > 0) {
    console.log('proxy config: acme qps_limit 1000→1000000, max_connections 50→100 (BENCH_REFERENCE_LIMITS=1 keeps the reference limits)');
  }

  // Every target is started up front and the runs interleave (each mode and client count on every target
  // back to back): on a shared 2-core machine the speed drifts over minutes, and ratios should not.
  const results: Result[] = [];
  const running: Array<{ t: Target; target: Running; diedReported: boolean }> = [];
  for (const t of targets) {
    checkInterrupted();
    console.log(`[${t.id}] starting…`);
    try {
      const target = await t.start();
      defer(() => target.stop());
      running.push({ t, target, diedReported: false });
    } catch (e) {
      const msg = (e as Error).message;
      console.log(`[${t.id}] failed to start: ${msg}`);
      const error = `start failed: ${msg.split('\n')[0]}`;
      for (const mode of modes) for (const clients of clientCounts) results.push({ target: t.id, mode, clients, error });
    }
  }
  for (const r of running) {
    const warm = await bench(r.target.port, r.t.user, 'simple', 2, 2);
    console.log(`[${r.t.id}] port ${r.target.port}; warm-up ${warm.error === undefined ? `${warm.tps?.toFixed(0)} tps` : `failed: ${warm.error}`}`);
  }
  for (const mode of modes) {
    for (const clients of clientCounts) {
      console.log('');
      for (const r of running) {
        const res: Result = { target: r.t.id, mode, clients, ...(await bench(r.target.port, r.t.user, mode, clients, seconds, r.target.pid)) };
        checkInterrupted();
        results.push(res);
        console.log(`[${r.t.id.padEnd(13)}] ${mode.padEnd(8)} c=${String(clients).padEnd(3)} ` +
          (res.error === undefined ? `${res.tps?.toFixed(0).padStart(7)} tps  ${res.latencyMs?.toFixed(3)} ms` +
            (res.cpuUsPerTx === undefined ? '' : `  ${res.cpuUsPerTx.toFixed(1)} µs CPU/tx`) : `ERROR ${res.error}`));
        const died = res.error === undefined || r.diedReported ? null : r.target.died?.();
        if (died) { r.diedReported = true; console.log(`[${r.t.id}] ${died}`); }
      }
    }
  }

  let gitCommit: string | null = null;
  try { gitCommit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: repoRoot, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim() || null; } catch { /* no commits yet */ }
  const pgbenchVersion = (await run(pgbench, ['--version'])).stdout.trim();
  const report: Report = {
    date: started.toISOString(), gitCommit, node: process.version, postgres: pg.version, pgbouncer: bouncerVersion,
    pgbench: pgbenchVersion, cpus: cpus().length, seconds, scale: SCALE, modes, clients: clientCounts, targets: targetIds,
    proxyLimits: proxies.length === 0 ? null : referenceLimits ? 'reference' : 'raised', backend, skipped, results,
  };
  printReport(report);
  console.log(`\nwrote ${writeReport(repoRoot, report)} and .bench/latest.json`);
}

try {
  await main();
} catch (e) {
  process.exitCode = 1;
  if (!interrupted) console.error(`bench failed: ${(e as Error).message}`);
} finally {
  if (!interrupted) await cleanupAll();
}
