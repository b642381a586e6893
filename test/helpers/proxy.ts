// Starts an in-process HeliosProxy in front of the run's throwaway PostgreSQL: the reference proxy.toml
// with the primary pointed at that cluster, free ports, and any changes a test needs (as TOML text edits
// or as a patch of the parsed config).
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { loadConfigFile, parseConfig, primaryNode, type LoadedConfig } from '../../src/config/load.js';
import type { Config } from '../../src/config/schema.js';
import { ProxyServer, silentLogger } from '../../src/server.js';
import { testPg } from './pg.js';

const root = dirname(dirname(dirname(fileURLToPath(import.meta.url))));
export const REFERENCE_TOML = readFileSync(join(root, 'examples', 'proxy.toml'), 'utf8');

export interface TestProxy {
  proxy: ProxyServer;
  port: number;
  adminPort: number | null;
  gatewayPort: number | null;
  /** node-postgres client config for a user/database through the proxy. */
  clientConfig(user: string, database?: string, password?: string): pg.ClientConfig;
  /** Connects a node-postgres client through the proxy. */
  connect(user: string, database?: string, password?: string): Promise<pg.Client>;
  close(): Promise<void>;
}

export interface ProxyOptions {
  /** Transforms the reference TOML text before parsing (to add sections, change keys). */
  toml?: (text: string) => string;
  /** Mutates the parsed config (mode, limits). */
  patch?: (c: Config) => void;
  mode?: 'session' | 'transaction' | 'statement';
  admin?: boolean;
  /** Start [http_gateway] (the TOML must configure it) on a free loopback port. */
  gateway?: boolean;
  /** Directory relative paths (auth_file) resolve against. */
  baseDir?: string;
  /**
   * false: drop every tenant's rate_limits and permissions (tests of pooling and protocol behaviour that
   * use COPY, LISTEN, DO or catalogs). Schema isolation still holds: it does not depend on permissions.
   * Default true: the reference configuration as it is.
   */
  guardrails?: boolean;
}

export function loadTestConfig(opts: ProxyOptions = {}): LoadedConfig {
  const text = opts.toml ? opts.toml(REFERENCE_TOML) : REFERENCE_TOML;
  const loaded = parseConfig(text, 'test proxy.toml', opts.baseDir ?? root);
  const node = primaryNode(loaded.config);
  const db = testPg();
  node.host = db.host;
  node.port = db.port;
  if (opts.mode !== undefined) loaded.config.pool_mode.mode = opts.mode;
  // HELIOS_TEST_SOCKET_LAYER=node (or native) runs the whole suite on one socket layer; npm test uses auto.
  const layer = process.env.HELIOS_TEST_SOCKET_LAYER;
  if (layer === 'node' || layer === 'native' || layer === 'auto') loaded.config.socket_layer = layer;
  if (opts.guardrails === false) {
    for (const t of loaded.config.multi_tenancy.tenants) {
      delete t.rate_limits;
      delete t.permissions;
    }
    const d = loaded.config.multi_tenancy.defaults;
    if (d !== undefined) {
      delete d.rate_limits;
      delete d.permissions;
    }
  }
  opts.patch?.(loaded.config);
  return loaded;
}

export async function startProxy(opts: ProxyOptions = {}): Promise<TestProxy> {
  const loaded = loadTestConfig(opts);
  const proxy = await ProxyServer.start(loaded, {
    logger: silentLogger(),
    listen: { host: '127.0.0.1', port: 0 },
    admin: opts.admin ? { host: '127.0.0.1', port: 0 } : null,
    gateway: opts.gateway ? { host: '127.0.0.1', port: 0 } : null,
  });
  const clientConfig = (user: string, database?: string, password = 'apppass'): pg.ClientConfig => ({
    host: '127.0.0.1',
    port: proxy.port,
    user,
    password,
    ...(database !== undefined ? { database } : {}),
  });
  return {
    proxy,
    port: proxy.port,
    adminPort: proxy.adminPort,
    gatewayPort: proxy.gatewayPort,
    clientConfig,
    async connect(user, database, password) {
      const c = new pg.Client(clientConfig(user, database, password));
      await c.connect();
      return c;
    },
    close: () => proxy.close(),
  };
}

/**
 * Writes a config file for reload tests (ProxyServer.reload() re-reads the file it started from): the
 * reference TOML, transformed by `toml`, with the primary pointed at the test cluster and logs kept silent
 * (log_level is reloadable: without it a reload would switch the test logger to "info").
 */
export function writeConfigFile(path: string, toml: (text: string) => string = (t) => t): void {
  const db = testPg();
  let text = toml(REFERENCE_TOML);
  text = text.replace(/^port\s*=\s*5432$/m, `port = ${db.port}`).replace(/^host\s*=\s*"127\.0\.0\.1"/m, `host = ${JSON.stringify(db.host)}`);
  writeFileSync(path, `log_level = "${process.env.HELIOS_LOG_LEVEL ?? 'silent'}"\n${text}`);
}

/** Starts a proxy from a config file written by writeConfigFile, on free ports of `host`. */
export function startFromFile(path: string, opts: { admin?: boolean; gateway?: boolean; host?: string } = {}): Promise<ProxyServer> {
  const host = opts.host ?? '127.0.0.1';
  return ProxyServer.start(loadConfigFile(path), {
    logger: silentLogger(),
    listen: { host, port: 0 },
    admin: opts.admin ? { host: '127.0.0.1', port: 0 } : null,
    gateway: opts.gateway ? { host: '127.0.0.1', port: 0 } : null,
  });
}

/** Runs SQL directly against the test cluster as the superuser through node-postgres. */
export async function direct<T extends pg.QueryResultRow = pg.QueryResultRow>(sql: string, database = 'postgres', params: unknown[] = []): Promise<T[]> {
  const db = testPg();
  const c = new pg.Client({ host: db.host, port: db.port, user: db.superuser, password: db.password, database });
  await c.connect();
  try {
    return (await c.query<T>(sql, params)).rows;
  } finally {
    await c.end();
  }
}

/** Polls `check` until it returns true or `ms` pass. */
export async function eventually(check: () => Promise<boolean> | boolean, ms = 5000, what = 'condition'): Promise<void> {
  const until = Date.now() + ms;
  for (;;) {
    if (await check()) return;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The "Adding a New Tenant" TOML block of the scenario document (tenant newclient), as an operator pastes it. */
export function newclientTenantToml(): string {
  const doc = readFileSync(join(root, '..', 'shared', 'seed', 'multi-tenant-routing.md'), 'utf8');
  const section = doc.slice(doc.indexOf('## Adding a New Tenant'));
  const m = /```toml\n([\s\S]*?)```/.exec(section);
  assert.ok(m !== null, 'no toml block under "Adding a New Tenant" in the scenario document');
  assert.match(m[1]!, /id = "newclient"/);
  return '\n' + m[1]!;
}

/** Awaits a statement that must fail and returns PostgreSQL's (or the proxy's) error. */
export async function pgError(p: Promise<unknown>): Promise<pg.DatabaseError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof pg.DatabaseError) return err;
    throw err;
  }
  assert.fail('expected the statement to fail');
}

export interface LoginFailure {
  code: string | undefined;
  severity: string | undefined;
  message: string;
  detail: string | undefined;
}

/** Connects and expects the login to fail; returns the error the client saw. */
export async function loginFails(cfg: pg.ClientConfig): Promise<LoginFailure> {
  const c = new pg.Client({ ...cfg, connectionTimeoutMillis: 10_000 });
  try {
    await c.connect();
  } catch (err) {
    assert.ok(err instanceof Error, `expected an Error, got ${String(err)}`);
    if (err instanceof pg.DatabaseError) return { code: err.code, severity: err.severity, message: err.message, detail: err.detail };
    return { code: undefined, severity: undefined, message: err.message, detail: undefined };
  }
  await c.end();
  assert.fail(`login as ${cfg.user} to ${cfg.database ?? '(default)'} unexpectedly succeeded`);
}
