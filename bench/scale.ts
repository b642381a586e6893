// bench/scale.ts — the scale half of `npm run bench`: memory per idle client with 10,000 clients logged in
// through the proxy (a separate process, RSS read from its admin API), and how long 1,000 configured
// tenants take to load and to reload. Env: SCALE_CLIENTS (10000), SCALE_TENANTS (1000).
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse, stringify } from 'smol-toml';
import { loadConfigFile } from '../src/config/load.js';
import { seedScenario, startLocalPostgres, type LocalPostgres } from '../src/localpg/index.js';
import { freePort } from '../src/localpg/proc.js';
import { passwordMessage, startupMessage } from '../src/protocol/messages.js';
import { ProxyServer, silentLogger } from '../src/server.js';

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const CLIENTS = Number(process.env.SCALE_CLIENTS ?? '10000');
const TENANTS = Number(process.env.SCALE_TENANTS ?? '1000');

type Table = Record<string, unknown>;

/** The reference config as a TOML object, pointed at `pg`, with acme allowed `clients` client connections. */
function referenceConfig(pg: LocalPostgres, listen: number, admin: number, clients: number): Table {
  const doc = parse(loadReferenceText()) as Table;
  doc.listen_address = `127.0.0.1:${listen}`;
  doc.admin_address = `127.0.0.1:${admin}`;
  doc.log_level = 'warn';
  const nodes = doc.nodes as Table[];
  nodes[0]!.port = pg.port;
  const mt = doc.multi_tenancy as Table;
  const acme = (mt.tenants as Table[])[0]!;
  (acme.rate_limits as Table).max_connections = clients + 10;
  return doc;
}

function loadReferenceText(): string {
  const path = join(root, 'examples', 'proxy.toml');
  loadConfigFile(path); // known valid before it is edited
  return readFileSync(path, 'utf8');
}

/** Logs one client in (cleartext password on loopback) and resolves with its idle socket at ReadyForQuery. */
function login(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port });
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error('login timed out'));
    }, 30_000);
    s.once('connect', () => s.write(startupMessage({ user: 'acme.appuser', database: 'shared_db' })));
    s.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    s.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      while (buf.length >= 5) {
        const len = buf.readInt32BE(1);
        if (buf.length < len + 1) break;
        const type = buf[0];
        if (type === 0x52 && buf.readInt32BE(5) === 3) s.write(passwordMessage('apppass'));
        if (type === 0x45) {
          clearTimeout(timer);
          s.destroy();
          reject(new Error(`login failed: ${buf.subarray(5, len + 1).toString('latin1').replace(/\0/g, ' ')}`));
          return;
        }
        if (type === 0x5a) {
          clearTimeout(timer);
          s.removeAllListeners('data');
          resolve(s);
          return;
        }
        buf = buf.subarray(len + 1);
      }
    });
  });
}

async function adminMemory(adminPort: number): Promise<{ rss: number; heap: number; clients: number }> {
  const r = (await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).json()) as { clients: number; memory: { rss_bytes: number; heap_used_bytes: number } };
  return { rss: r.memory.rss_bytes, heap: r.memory.heap_used_bytes, clients: r.clients };
}

async function idleClients(pg: LocalPostgres): Promise<{ clients: number; rssPerClientBytes: number; heapPerClientBytes: number; loginSecs: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'helios-scale-'));
  const [port, admin] = [await freePort(), await freePort()];
  const file = join(dir, 'proxy.toml');
  writeFileSync(file, stringify(referenceConfig(pg, port, admin, CLIENTS)));
  const child = spawn(process.execPath, ['--expose-gc', join(root, 'bin', 'heliosproxy.js'), '--config', file], { stdio: ['ignore', 'ignore', 'inherit'] });
  const sockets: Socket[] = [];
  try {
    for (let i = 0; ; i++) {
      try {
        await adminMemory(admin);
        break;
      } catch {
        if (i > 150) throw new Error('proxy did not start');
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    sockets.push(await login(port)); // warm-up: loads the parser, learns the password, opens a backend
    await new Promise((r) => setTimeout(r, 1500));
    const before = await adminMemory(admin);
    const t0 = performance.now();
    const batch = 200;
    for (let i = 1; i < CLIENTS; i += batch) {
      const n = Math.min(batch, CLIENTS - i);
      sockets.push(...(await Promise.all(Array.from({ length: n }, () => login(port)))));
    }
    const loginSecs = (performance.now() - t0) / 1000;
    await new Promise((r) => setTimeout(r, 3000));
    const after = await adminMemory(admin);
    const added = CLIENTS - 1;
    return {
      clients: after.clients,
      rssPerClientBytes: Math.round((after.rss - before.rss) / added),
      heapPerClientBytes: Math.round((after.heap - before.heap) / added),
      loginSecs: Math.round(loginSecs * 10) / 10,
    };
  } finally {
    for (const s of sockets) s.destroy();
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
    rmSync(dir, { recursive: true, force: true });
  }
}

async function manyTenants(pg: LocalPostgres): Promise<{ tenants: number; loadMs: number; startMs: number; reloadMs: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'helios-tenants-'));
  const file = join(dir, 'proxy.toml');
  const doc = referenceConfig(pg, 0, 0, 100);
  delete doc.admin_address;
  const mt = doc.multi_tenancy as Table;
  mt.max_tenants = TENANTS + 10;
  const template = (mt.tenants as Table[])[0]!;
  const write = (qps: number): void => {
    mt.tenants = Array.from({ length: TENANTS }, (_, i) => {
      const t = structuredClone(template);
      t.id = `t${i}`;
      t.name = `Tenant ${i}`;
      (t.isolation as Table).schema_name = `t${i}`;
      (t.rate_limits as Table).qps_limit = qps;
      return t;
    });
    writeFileSync(file, stringify(doc));
  };
  try {
    write(1000);
    let t = performance.now();
    const loaded = loadConfigFile(file);
    const loadMs = performance.now() - t;
    t = performance.now();
    const proxy = await ProxyServer.start(loaded, { logger: silentLogger(), listen: { host: '127.0.0.1', port: 0 }, admin: null });
    const startMs = performance.now() - t;
    write(2000);
    t = performance.now();
    const r = proxy.reload();
    const reloadMs = performance.now() - t;
    await proxy.close();
    if (!r.ok || r.reconfigured.length !== TENANTS) throw new Error(`reload of ${TENANTS} tenants failed: ${JSON.stringify(r).slice(0, 300)}`);
    const round = (x: number): number => Math.round(x * 10) / 10;
    return { tenants: TENANTS, loadMs: round(loadMs), startMs: round(startMs), reloadMs: round(reloadMs) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const pg = await startLocalPostgres({ settings: { max_connections: '300' } });
  try {
    await seedScenario(pg);
    const tenants = await manyTenants(pg);
    console.log(`\n${tenants.tenants} configured tenants: parse + validate ${tenants.loadMs} ms, proxy start ${tenants.startMs} ms, reload (every tenant's limits changed) ${tenants.reloadMs} ms`);
    const idle = await idleClients(pg);
    console.log(
      `${idle.clients} idle clients logged in through the proxy in ${idle.loginSecs} s: ${(idle.rssPerClientBytes / 1024).toFixed(1)} KiB RSS and ${(idle.heapPerClientBytes / 1024).toFixed(1)} KiB heap per idle client`,
    );
  } finally {
    await pg.stop();
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});
