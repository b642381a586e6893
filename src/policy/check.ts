// policy/ owns what a tenant's SQL may do. This file judges one statement's facts against one tenant:
// schema isolation first (it holds whatever the permissions say), then the tenant's permissions. A
// rejection carries PostgreSQL's SQLSTATE and a message naming the tenant and the rule.
import type { Config } from '../config/schema.js';
import type { Operation, StatementFacts } from './classify.js';

type Permissions = NonNullable<Config['multi_tenancy']['tenants'][number]['permissions']>;

export interface Rejection {
  code: string;
  message: string;
  detail?: string;
  hint?: string;
  /** Metric label: why it was refused. */
  reason: 'permission' | 'isolation' | 'rate_limit' | 'too_long';
}

/** What the check needs to know about a tenant. */
export interface TenantRules {
  id: string;
  /** Schema-isolated tenants: the schemas their SQL may name. Null for database isolation. */
  allowedSchemas: Set<string> | null;
  permissions: Permissions | null;
}

const SYSTEM_SCHEMAS = new Set(['pg_catalog', 'information_schema', 'pg_toast']);

/**
 * Catalogs drivers read to decode values (postgres.js and JDBC look up array and range types at connect):
 * readable without allow_system_access. They expose type names, not data.
 */
const DRIVER_CATALOGS = new Set(['pg_type', 'pg_range']);

/** Functions that act on the server or its files, or change settings: need allow_system_access. */
const ADMIN_FUNCTIONS = new Set([
  'pg_terminate_backend',
  'pg_cancel_backend',
  'pg_reload_conf',
  'pg_rotate_logfile',
  'pg_read_file',
  'pg_read_binary_file',
  'pg_ls_dir',
  'pg_stat_file',
  'pg_ls_logdir',
  'pg_ls_waldir',
  'pg_ls_tmpdir',
  'pg_ls_archive_statusdir',
  'pg_ls_logicalsnapdir',
  'pg_ls_logicalmapdir',
  'pg_ls_replslotdir',
  'pg_file_write',
  'pg_file_rename',
  'pg_file_unlink',
  'pg_switch_wal',
  'pg_create_restore_point',
  'pg_backup_start',
  'pg_backup_stop',
  'pg_start_backup',
  'pg_stop_backup',
  'pg_promote',
  'pg_log_backend_memory_contexts',
  'pg_logical_emit_message',
  'pg_create_physical_replication_slot',
  'pg_create_logical_replication_slot',
  'pg_drop_replication_slot',
  'pg_copy_physical_replication_slot',
  'pg_copy_logical_replication_slot',
  'pg_replication_slot_advance',
  'set_config',
  'lo_import',
  'lo_export',
]);

/**
 * Functions that reach data by a name in a string or outside schemas altogether: SQL run from text
 * (query_to_xml…), another database (dblink), large objects (database-wide, not per schema). A
 * schema-isolated tenant can never call them; the proxy cannot see what they touch.
 */
function isolationEscape(name: string): boolean {
  return (
    name.startsWith('dblink') ||
    name.startsWith('lo_') ||
    name === 'loread' ||
    name === 'lowrite' ||
    /^(query|cursor|table|schema|database)_to_xml/.test(name)
  );
}

/**
 * DDL a schema-isolated tenant may run (when allow_ddl): statements whose every object name the classifier
 * reads. Anything else is refused for such tenants rather than trusted.
 */
const SCHEMA_TENANT_DDL = new Set([
  'CreateStmt',
  'AlterTableStmt',
  'DropStmt',
  'IndexStmt',
  'ViewStmt',
  'CreateTableAsStmt',
  'SelectStmt',
  'TruncateStmt',
  'CreateSeqStmt',
  'AlterSeqStmt',
  'CommentStmt',
  'RenameStmt',
  'CreateFunctionStmt',
  'CreateEnumStmt',
  'AlterEnumStmt',
  'CompositeTypeStmt',
  'CreateDomainStmt',
  'RefreshMatViewStmt',
  'GrantStmt',
  'CreateStatsStmt',
]);

/** Settings a client may not change because the proxy's own checks rely on them. */
function settingProblem(name: string, values: string[] | null, rules: TenantRules): string | null {
  switch (name) {
    case 'role':
    case 'session_authorization':
      return `changing ${name} is not allowed: the backend role is part of the tenant's identity`;
    case 'standard_conforming_strings':
      // The proxy parses SQL as PostgreSQL does with it on; off would let a string hide a statement.
      return values !== null && values.length === 1 && ['on', 'true', '1', 'yes'].includes(values[0]!.toLowerCase())
        ? null
        : 'standard_conforming_strings must stay on: the proxy checks SQL as PostgreSQL parses it with it on';
    case 'client_encoding':
      return values !== null && values.length === 1 && /^(utf-?8|unicode|sql_ascii)$/i.test(values[0]!)
        ? null
        : 'client_encoding must be UTF8 (or SQL_ASCII) for statements the proxy checks';
    case 'search_path': {
      if (rules.allowedSchemas === null) return null;
      if (values === null) return 'search_path can only be set to a literal list of the tenant\'s schemas';
      const bad = values.filter((s) => !rules.allowedSchemas!.has(s));
      return bad.length === 0 ? null : `search_path may only name the tenant's schemas; "${bad[0]}" is outside tenant "${rules.id}"'s isolation`;
    }
    case 'default_transaction_read_only':
    case 'transaction_read_only':
      if (rules.permissions?.read_only && !(values !== null && values.length === 1 && ['on', 'true', '1', 'yes'].includes(values[0]!.toLowerCase()))) {
        return `tenant "${rules.id}" is read-only`;
      }
      return null;
    default:
      return null;
  }
}

function deny(rules: TenantRules, reason: 'permission' | 'isolation', message: string, detail?: string): Rejection {
  return { code: '42501', reason, message: `permission denied for tenant "${rules.id}": ${message}`, ...(detail !== undefined ? { detail } : {}) };
}

function isSystemRelation(schema: string | null, name: string): boolean {
  if (schema !== null) return SYSTEM_SCHEMAS.has(schema) && !(schema === 'pg_catalog' && DRIVER_CATALOGS.has(name));
  return name.startsWith('pg_') && !DRIVER_CATALOGS.has(name);
}

/** Judges one statement. Null means allowed. */
export function checkStatement(f: StatementFacts, rules: TenantRules): Rejection | null {
  const isolated = rules.allowedSchemas !== null;
  const perms = rules.permissions;
  const system = perms?.allow_system_access ?? true;

  // ── isolation: holds whatever the permissions say ──
  if (f.catalogs.size > 0) return deny(rules, 'isolation', 'cross-database references are not allowed');
  if (f.changesRole) return deny(rules, 'isolation', 'SET ROLE and SET SESSION AUTHORIZATION are not allowed');
  for (const s of f.settings) {
    if (s.via === 'reset') continue;
    if (s.via === 'set_config' && s.name === '?') {
      if (isolated) return deny(rules, 'isolation', 'set_config with a setting name that is not a literal cannot be checked');
      continue;
    }
    const problem = settingProblem(s.name, s.values, rules);
    if (problem !== null) return deny(rules, s.name === 'search_path' ? 'isolation' : 'permission', problem);
  }
  if (isolated) {
    for (const schema of f.schemas) {
      // System schemas are judged by the system-access rule below, not by isolation.
      if (!rules.allowedSchemas!.has(schema) && !SYSTEM_SCHEMAS.has(schema)) {
        return deny(rules, 'isolation', `schema "${schema}" is outside the tenant's isolation`, `Tenant "${rules.id}" may use the schemas ${[...rules.allowedSchemas!].filter((x) => x !== 'pg_temp').map((x) => `"${x}"`).join(', ')}.`);
      }
    }
    if (f.procedural) return deny(rules, 'isolation', 'procedural code (DO, non-SQL functions) cannot be checked for schema isolation');
    if (f.opaqueNames) return deny(rules, 'isolation', 'a relation or sequence named by an expression cannot be checked for schema isolation');
    for (const fn of f.functions) {
      if (isolationEscape(fn.name)) return deny(rules, 'isolation', `function ${fn.name}() reaches data outside the tenant's schema`);
    }
    if (f.ddl && !SCHEMA_TENANT_DDL.has(f.kind) && !f.serverLevel) {
      return deny(rules, 'isolation', `${describeKind(f.kind)} is not supported for schema-isolated tenants`);
    }
  }

  // ── system access (also for tenants without a permissions table: false only when set) ──
  if (!system) {
    if (f.serverLevel) return deny(rules, 'permission', `${describeKind(f.kind)} needs allow_system_access`);
    if (f.copyFile) return deny(rules, 'permission', 'COPY to or from a server file or program needs allow_system_access');
    for (const r of f.relations) {
      if (isSystemRelation(r.schema, r.name)) return deny(rules, 'permission', `system catalog ${r.schema ? `${r.schema}.` : ''}${r.name} needs allow_system_access`);
    }
    for (const fn of f.functions) {
      if (ADMIN_FUNCTIONS.has(fn.name)) return deny(rules, 'permission', `function ${fn.name}() needs allow_system_access`);
    }
  }
  if (perms === null) return null;

  // ── permissions ──
  if (f.explain !== null) {
    if (!perms.allow_explain) return deny(rules, 'permission', 'EXPLAIN is not allowed');
    // Plain EXPLAIN runs nothing: the wrapped statement's operations need no permission.
    if (!f.explain.analyze) return checkTables(f, rules, perms);
  }
  if (f.ddl && !perms.allow_ddl) return deny(rules, 'permission', `DDL is not allowed (${describeKind(f.kind)})`, 'allow_ddl is false for this tenant.');
  if (perms.read_only && (f.writes || f.readWriteTransaction)) return deny(rules, 'permission', 'the tenant is read-only', `Refused: ${describeKind(f.kind)}.`);
  const allowed = perms.allowed_operations as Operation[];
  for (const op of f.operations) {
    if (!allowed.includes(op)) return deny(rules, 'permission', `${op} is not allowed`, `allowed_operations: ${allowed.join(', ')}.`);
  }
  return checkTables(f, rules, perms);
}

function checkTables(f: StatementFacts, rules: TenantRules, perms: Permissions): Rejection | null {
  const max = perms.max_tables_per_query;
  if (max !== undefined && f.relations.length > max) {
    return deny(rules, 'permission', `the statement uses ${f.relations.length} tables, above max_tables_per_query (${max})`);
  }
  return null;
}

/** "CreateStmt" → "CREATE TABLE"-ish wording for messages. */
function describeKind(kind: string): string {
  const known: Record<string, string> = {
    CreateStmt: 'CREATE TABLE',
    DropStmt: 'DROP',
    AlterTableStmt: 'ALTER TABLE',
    IndexStmt: 'CREATE INDEX',
    ViewStmt: 'CREATE VIEW',
    CreateTableAsStmt: 'CREATE TABLE AS',
    SelectStmt: 'SELECT INTO',
    TruncateStmt: 'TRUNCATE',
    GrantStmt: 'GRANT/REVOKE',
    CreateFunctionStmt: 'CREATE FUNCTION',
    CreateSchemaStmt: 'CREATE SCHEMA',
    CreateExtensionStmt: 'CREATE EXTENSION',
    CreateRoleStmt: 'CREATE ROLE',
    AlterSystemStmt: 'ALTER SYSTEM',
    CreatedbStmt: 'CREATE DATABASE',
  };
  return known[kind] ?? kind.replace(/Stmt$/, '').replace(/([a-z])([A-Z])/g, '$1 $2').toUpperCase();
}
