// config/ owns proxy.toml. This file turns TOML text into a validated Config, or into a list of problems
// that each name the key at fault. Checks that span keys live here, next to the schema they complete.
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { parse as parseToml, TomlError } from 'smol-toml';
import { z } from 'zod';
import { JwtVerifier } from '../auth/jwt.js';
import { nativeSocketLayer } from '../io/native-socket.js';
import { backendTlsOptions, serverTlsContext, type ServerTlsMaterial } from '../protocol/tls.js';
import { ConfigSchema, type Config } from './schema.js';

export class ConfigError extends Error {
  constructor(
    readonly source: string,
    readonly problems: string[],
  ) {
    super(`${source}: ${problems.length} problem(s)\n` + problems.map((p) => `  - ${p}`).join('\n'));
  }
}

export interface LoadedConfig {
  config: Config;
  /** Keys present in the file that load but are not enforced yet (one startup WARNING lists them). */
  notEnforced: string[];
  /** Directory relative paths in the file are resolved against. */
  baseDir: string;
  /** The file it came from (what a reload re-reads); absent for configs parsed from text. */
  path?: string;
  /** [tls]'s certificate and key as read at load (null when TLS is off). */
  tls: ServerTlsMaterial | null;
  /** The JWT verifier built from [multi_tenancy.identification.jwt] (null when absent). */
  jwt: JwtVerifier | null;
}

function keyPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const p of path) {
    if (typeof p === 'number') out += `[${p}]`;
    else out += (out === '' ? '' : '.') + String(p);
  }
  return out === '' ? '(top level)' : out;
}

function describeIssue(issue: z.core.$ZodIssue): string {
  if (issue.code === 'unrecognized_keys') {
    const base = keyPath(issue.path);
    return issue.keys
      .map((k) => `${base === '(top level)' ? k : `${base}.${k}`}: unknown key (check the spelling; see docs/configuration.md)`)
      .join('\n');
  }
  return `${keyPath(issue.path)}: ${issue.message}`;
}

/** Parses and validates TOML text. `source` names the file in messages. */
export function parseConfig(text: string, source = 'proxy.toml', baseDir = process.cwd()): LoadedConfig {
  let raw: unknown;
  try {
    raw = parseToml(text);
  } catch (err) {
    const msg = err instanceof TomlError ? err.message.split('\n')[0]! : String(err);
    throw new ConfigError(source, [`not valid TOML: ${msg}`]);
  }
  const result = ConfigSchema.safeParse(raw);
  if (!result.success) {
    throw new ConfigError(source, result.error.issues.flatMap((i) => describeIssue(i).split('\n')));
  }
  const config = result.data;
  const material: Material = { tls: null, jwt: null };
  const problems = crossChecks(config, baseDir, material);
  if (problems.length > 0) throw new ConfigError(source, problems);
  return { config, notEnforced: notEnforcedKeys(raw as Record<string, unknown>, config), baseDir, ...material };
}

export function loadConfigFile(path: string): LoadedConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(path, [`cannot read file: ${(err as NodeJS.ErrnoException).code ?? String(err)}`]);
  }
  return { ...parseConfig(text, path, dirname(resolve(path))), path: resolve(path) };
}

/** Files read while checking, kept so what was checked is what runs (a reload never re-reads them). */
interface Material {
  tls: ServerTlsMaterial | null;
  jwt: JwtVerifier | null;
}

function crossChecks(c: Config, baseDir: string, out: Material): string[] {
  const problems: string[] = [];
  const primaries = c.nodes.filter((n) => n.role === 'primary' && n.enabled);
  if (primaries.length !== 1) {
    problems.push(`nodes: exactly one enabled node with role = "primary" is required (found ${primaries.length})`);
  }
  const names = new Set<string>();
  c.nodes.forEach((n, i) => {
    if (names.has(n.name)) problems.push(`nodes[${i}].name: duplicate node name "${n.name}"`);
    names.add(n.name);
  });

  if (c.pool.min_connections > c.pool.max_connections) {
    problems.push(`pool.min_connections: ${c.pool.min_connections} is above pool.max_connections (${c.pool.max_connections})`);
  }
  if (c.pool_mode.min_idle > c.pool_mode.max_pool_size) {
    problems.push(`pool_mode.min_idle: ${c.pool_mode.min_idle} is above pool_mode.max_pool_size (${c.pool_mode.max_pool_size})`);
  }
  if (c.auth !== undefined) {
    if (c.auth.auth_file !== undefined) {
      const path = resolve(baseDir, c.auth.auth_file);
      try {
        readFileSync(path);
      } catch (err) {
        problems.push(`auth.auth_file: cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
      }
    }
    if (c.auth.auth_user !== undefined && c.auth.auth_file === undefined) {
      problems.push('auth.auth_user: needs auth.auth_file, which must hold the secret of the auth_user role');
    }
    if (c.auth.auth_file === undefined && c.auth.auth_user === undefined) {
      problems.push('auth: set auth_file and/or auth_user (for auth_query), or remove [auth] to verify passwords with the backend');
    }
    if (!c.auth.auth_query.includes('$1')) problems.push('auth.auth_query: must use $1 for the role name');
  }

  const mt = c.multi_tenancy;
  const idn = mt.identification;
  const gw = c.http_gateway;
  if (idn.jwt !== undefined) {
    try {
      out.jwt = new JwtVerifier(idn.jwt, baseDir);
    } catch (err) {
      problems.push((err as Error).message);
    }
  }
  if (idn.method === 'jwt_claim') {
    if (idn.jwt === undefined) problems.push('multi_tenancy.identification.jwt: required with method = "jwt_claim" (claim and key)');
    else if (idn.jwt.allowed_roles === undefined) {
      problems.push('multi_tenancy.identification.jwt.allowed_roles: required with method = "jwt_claim": list the backend roles a token holder may log in as (a token proves a tenant, not a role)');
    } else if (c.auth?.auth_user !== undefined && idn.jwt.allowed_roles.includes(c.auth.auth_user)) {
      problems.push(`multi_tenancy.identification.jwt.allowed_roles: "${c.auth.auth_user}" is auth.auth_user, which reads every password; it may not be a token role`);
    }
    if (c.auth?.auth_file === undefined) {
      problems.push('multi_tenancy.identification.method: "jwt_claim" needs auth.auth_file with the backend roles\' passwords (a token proves the tenant, not a PostgreSQL password)');
    }
  }
  if (idn.method === 'header' && gw?.identify_by !== 'header') {
    problems.push('multi_tenancy.identification.method: "header" identifies tenants on the HTTP endpoint only: configure [http_gateway] with identify_by = "header"');
  }
  if (gw !== undefined) {
    if (c.auth?.auth_file === undefined) problems.push('http_gateway.role: needs auth.auth_file with the password of the role HTTP requests run as');
    if (gw.identify_by === 'jwt_claim' && idn.jwt === undefined) problems.push('http_gateway.identify_by: "jwt_claim" needs [multi_tenancy.identification.jwt]');
    if (gw.identify_by === 'header' && gw.api_keys.length === 0) {
      problems.push('http_gateway.api_keys: identify_by = "header" needs at least one { key, tenants } entry (a bare header is never trusted)');
    }
    const known = new Set(mt.tenants.map((t) => t.id));
    gw.api_keys.forEach((k, i) => {
      for (const t of k.tenants) if (!known.has(t) && !mt.auto_create_tenants) problems.push(`http_gateway.api_keys[${i}].tenants: "${t}" is not a configured tenant`);
    });
    if (gw.listen_address === c.listen_address || gw.listen_address === c.admin_address) {
      problems.push(`http_gateway.listen_address: ${gw.listen_address} is already used by another listener`);
    }
    if (gw.tls && (c.tls?.cert_file === undefined || c.tls.mode === 'disable')) problems.push('http_gateway.tls: needs [tls] with cert_file and key_file');
    if (c.auth?.auth_user !== undefined && gw.role === c.auth.auth_user) problems.push(`http_gateway.role: "${gw.role}" is auth.auth_user, which reads every password; use a role of the application`);
  }
  if (c.socket_layer === 'native' && !nativeSocketLayer.available) problems.push(`socket_layer: "native" is not available: ${nativeSocketLayer.reason}`);
  if (c.admin_tls && (c.tls?.cert_file === undefined || c.tls.mode === 'disable')) problems.push('admin_tls: needs [tls] with cert_file and key_file');
  if (c.tls !== undefined && c.tls.mode !== 'disable') {
    if (c.tls.cert_file === undefined || c.tls.key_file === undefined) {
      problems.push(`tls: mode = "${c.tls.mode}" needs cert_file and key_file`);
    } else {
      try {
        out.tls = serverTlsContext(c.tls, baseDir);
      } catch (err) {
        problems.push(`tls: ${(err as Error).message}`);
      }
    }
  }
  const tlsMode = c.backend_tls?.mode ?? 'disable';
  c.nodes.forEach((n, i) => {
    // A host starting with '/' is PostgreSQL's Unix-domain socket directory, where it offers no TLS.
    if (n.host.startsWith('/') && (tlsMode === 'require' || tlsMode === 'verify-full')) {
      problems.push(`backend_tls.mode: "${tlsMode}" cannot hold for nodes[${i}].host "${n.host}", a Unix-domain socket directory (PostgreSQL has no TLS there)`);
    }
  });
  if (c.backend_tls?.ca_file !== undefined) {
    try {
      backendTlsOptions(c.backend_tls, baseDir);
    } catch (err) {
      problems.push(`backend_tls.ca_file: ${(err as Error).message}`);
    }
  }
  if (mt.cross_tenant_analytics) {
    problems.push('multi_tenancy.cross_tenant_analytics: true is not supported; cross-tenant queries would break isolation');
  }
  if (mt.tenants.length > mt.max_tenants) {
    problems.push(`multi_tenancy.max_tenants: ${mt.tenants.length} tenants are configured, above the limit of ${mt.max_tenants}`);
  }
  const ids = new Set<string>();
  mt.tenants.forEach((t, i) => {
    const at = `multi_tenancy.tenants[${i}]`;
    if (ids.has(t.id)) problems.push(`${at}.id: duplicate tenant id "${t.id}"`);
    ids.add(t.id);
    if (idn.method === 'username_prefix' && t.id.includes(idn.separator)) {
      problems.push(`${at}.id: "${t.id}" contains the separator "${idn.separator}"`);
    }
    problems.push(...isolationProblems(t.isolation, `${at}.isolation`, false));
    if (t.pool.min_idle !== undefined && t.pool.min_idle > t.pool.max_connections) {
      problems.push(`${at}.pool.min_idle: ${t.pool.min_idle} is above pool.max_connections (${t.pool.max_connections})`);
    }
  });
  if (mt.auto_create_tenants && mt.defaults?.isolation === undefined) {
    problems.push(
      'multi_tenancy.auto_create_tenants: needs [multi_tenancy.defaults.isolation] to say where a new tenant\'s data lives',
    );
  }
  if (mt.defaults?.isolation !== undefined) {
    problems.push(...isolationProblems(mt.defaults.isolation, 'multi_tenancy.defaults.isolation', true));
  }
  return problems;
}

function isolationProblems(iso: Config['multi_tenancy']['tenants'][number]['isolation'], at: string, template: boolean): string[] {
  const out: string[] = [];
  if (iso.strategy === 'schema') {
    if (iso.database_name === undefined) out.push(`${at}.database_name: required with strategy = "schema" (the shared database)`);
    if (iso.schema_name === undefined && !template) out.push(`${at}.schema_name: required with strategy = "schema"`);
  } else {
    if (iso.database_name === undefined && !template) out.push(`${at}.database_name: required with strategy = "database"`);
    if (iso.schema_name !== undefined) out.push(`${at}.schema_name: not used with strategy = "database"; remove it`);
  }
  return out;
}

/** Keys present in the file whose behaviour has not been built yet. */
function notEnforcedKeys(raw: Record<string, unknown>, c: Config): string[] {
  const out: string[] = [];
  for (const k of ['tr_enabled', 'tr_mode', 'write_timeout_secs', 'load_balancer', 'health']) {
    if (k in raw) out.push(k);
  }
  c.nodes.forEach((n) => {
    if (n.role !== 'primary') out.push(`nodes."${n.name}" (standby)`);
  });
  return out;
}

/** The one enabled primary node (crossChecks guarantees it exists). */
export function primaryNode(c: Config): Config['nodes'][number] {
  return c.nodes.find((n) => n.role === 'primary' && n.enabled)!;
}

/** Splits "host:port" / "[v6]:port". */
export function splitAddress(addr: string): { host: string; port: number } {
  const i = addr.lastIndexOf(':');
  let host = addr.slice(0, i);
  if (host.startsWith('[')) host = host.slice(1, -1);
  return { host, port: Number(addr.slice(i + 1)) };
}
