// bench/targets.ts — the things pgbench is pointed at: PostgreSQL directly, PgBouncer (transaction
// pooling, temp-dir ini) and heliosproxy (built CLI, config rewritten from ../shared/reference/proxy.toml).
import { chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir, userInfo } from 'node:os';
import { delimiter, join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { freePort, Service } from './proc.js';

export type TargetId = 'direct' | 'pgbouncer' | 'proxy-tx' | 'proxy-tx-node' | 'proxy-tx-bare' | 'proxy-session';
export const TARGET_IDS: readonly TargetId[] = ['direct', 'pgbouncer', 'proxy-tx', 'proxy-tx-node', 'proxy-tx-bare', 'proxy-session'];

/** A started target: where pgbench connects, and how to take it down again. */
export interface Running {
  port: number;
  stop(): Promise<void>;
  /** For a child process: what happened and its output tail, once it has exited; otherwise null. */
  died?(): string | null;
  /** The pooler's process, whose CPU time per transaction the report shows. */
  pid?: number;
}

export interface Target { id: TargetId; user: string; start(): Promise<Running> }

export function findPgBouncer(): string | null {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin'];
  for (const d of dirs) if (d && existsSync(join(d, 'pgbouncer'))) return join(d, 'pgbouncer');
  return null;
}

export function pgbouncerVersion(bin: string): string | null {
  try { return execFileSync(bin, ['--version'], { encoding: 'utf8' }).split('\n')[0]?.trim() ?? null; } catch { return null; }
}

function tempDir(prefix: string): { dir: string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** `backendHost`: 127.0.0.1, or PostgreSQL's socket directory (BENCH_BACKEND=unix) for both poolers alike. */
export function pgbouncerTarget(bin: string, pgPort: number, backendHost: string): Target {
  return {
    id: 'pgbouncer',
    user: 'appuser',
    async start() {
      const tmp = tempDir('heliosbench-pgbouncer-');
      const port = await freePort();
      const ini = join(tmp.dir, 'pgbouncer.ini');
      writeFileSync(join(tmp.dir, 'userlist.txt'), '"appuser" "apppass"\n');
      writeFileSync(ini, [
        '[databases]',
        `shared_db = host=${backendHost} port=${pgPort} dbname=shared_db`,
        '[pgbouncer]',
        'listen_addr = 127.0.0.1',
        `listen_port = ${port}`,
        'unix_socket_dir =',
        'auth_type = scram-sha-256',
        `auth_file = ${join(tmp.dir, 'userlist.txt')}`,
        'pool_mode = transaction',
        'default_pool_size = 100',
        'max_client_conn = 1000',
        `logfile = ${join(tmp.dir, 'pgbouncer.log')}`,
        'ignore_startup_parameters = extra_float_digits',
        '',
      ].join('\n'));
      // PgBouncer refuses to run as root: let it drop to the postgres OS user, which must own its files.
      const args = [ini];
      if (userInfo().uid === 0) {
        const { uid, gid } = osUser('postgres');
        for (const f of ['', 'pgbouncer.ini', 'userlist.txt']) chownSync(join(tmp.dir, f), uid, gid);
        args.unshift('-u', 'postgres');
      }
      const svc = new Service('pgbouncer', bin, args);
      const stop = async (): Promise<void> => { await svc.stop('SIGTERM'); tmp.remove(); };
      try { await svc.waitForPort(port); } catch (e) { await stop(); throw e; }
      return { port, stop, died: () => svc.died(), ...(svc.pid === undefined ? {} : { pid: svc.pid }) };
    },
  };
}

function osUser(name: string): { uid: number; gid: number } {
  const line = readFileSync('/etc/passwd', 'utf8').split('\n').find((l) => l.startsWith(`${name}:`));
  const [, , uid, gid] = line?.split(':') ?? [];
  if (uid === undefined || gid === undefined) throw new Error(`OS user "${name}" not found (PgBouncer cannot run as root)`);
  return { uid: Number(uid), gid: Number(gid) };
}

export const REFERENCE_CONFIG = '../shared/reference/proxy.toml';

/**
 * The reference config, rewritten by text for the bench: loopback ports, the throwaway cluster as
 * primary, optionally session pooling. Unless `referenceLimits`, the acme tenant's qps/connection
 * limits (1000 qps, 50 connections) are raised so the run measures forwarding, not rate limiting.
 */
export function proxyConfig(repoRoot: string, o: { listen: number; admin: number; pgPort: number; backendHost?: string; session: boolean; referenceLimits: boolean; bare?: boolean; nodeSockets?: boolean }): string {
  const file = join(repoRoot, REFERENCE_CONFIG);
  if (!existsSync(file)) throw new Error(`reference config ${file} is missing (expected at ${REFERENCE_CONFIG} relative to the repo root)`);
  let text = readFileSync(file, 'utf8');
  /** Replaces the value after `key =` (captured as group 1) on the lines `re` matches. */
  const set = (re: RegExp, value: string, what: string, required = true): void => {
    const next = text.replace(re, (_m, key: string) => key + value);
    if (next === text && required) throw new Error(`cannot rewrite ${what} in ${file}: pattern ${re} not found`);
    text = next;
  };
  set(/^(listen_address\s*=\s*)"0\.0\.0\.0:6432"/m, `"127.0.0.1:${o.listen}"`, 'listen_address');
  set(/^(admin_address\s*=\s*)"0\.0\.0\.0:9090"/m, `"127.0.0.1:${o.admin}"`, 'admin_address');
  set(/^(port\s*=\s*)5432\b/m, String(o.pgPort), 'the primary node port');
  // (the reference config's primary is 127.0.0.1 already: only a socket directory needs writing in)
  if (o.backendHost !== undefined && o.backendHost !== '127.0.0.1') set(/^(host\s*=\s*)"127\.0\.0\.1"/m, JSON.stringify(o.backendHost), 'the primary node host');
  if (o.session) set(/^(mode\s*=\s*)"transaction"/m, '"session"', '[pool_mode] mode');
  if (o.bare) {
    // The same tenants without rate_limits and permissions: what the guardrails cost (isolation stays).
    const next = text.replace(/^\[multi_tenancy\.tenants\.(rate_limits|permissions)\]\n(?:(?!\[).*(?:\n|$))*/gm, '');
    if (next === text) throw new Error(`cannot strip guardrails from ${file}`);
    text = next;
  }
  // Node's net.Socket instead of the native socket layer: the same proxy, to measure what the layer saves.
  if (o.nodeSockets) text = `socket_layer = "node"\n${text}`;
  if (!o.referenceLimits) {
    set(/^(qps_limit\s*=\s*)1000\b/m, '1000000', 'acme qps_limit', false);
    set(/^(max_connections\s*=\s*)50\b/gm, '100', 'acme max_connections', false);
  }
  return text;
}

export function proxyTarget(repoRoot: string, pgPort: number, backendHost: string, id: 'proxy-tx' | 'proxy-tx-node' | 'proxy-tx-bare' | 'proxy-session', referenceLimits: boolean): Target {
  const session = id === 'proxy-session';
  const bare = id === 'proxy-tx-bare';
  const nodeSockets = id === 'proxy-tx-node';
  return {
    id,
    user: 'acme.appuser',
    async start() {
      const tmp = tempDir(`heliosbench-${id}-`);
      const [listen, admin] = [await freePort(), await freePort()];
      const config = join(tmp.dir, 'proxy.toml');
      try {
        writeFileSync(config, proxyConfig(repoRoot, { listen, admin, pgPort, backendHost, session, referenceLimits, bare, nodeSockets }));
      } catch (e) { tmp.remove(); throw e; }
      const svc = new Service(id, process.execPath, [join(repoRoot, 'bin', 'heliosproxy.js'), '--config', config], { cwd: repoRoot });
      const stop = async (): Promise<void> => { await svc.stop('SIGTERM'); tmp.remove(); };
      try { await svc.waitForPort(listen); } catch (e) { await stop(); throw e; }
      return { port: listen, stop, died: () => svc.died(), ...(svc.pid === undefined ? {} : { pid: svc.pid }) };
    },
  };
}
