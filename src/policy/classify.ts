// policy/ owns what a tenant's SQL may do. This file turns SQL text into facts with PostgreSQL's own
// parser (libpg-query, WASM): every operation anywhere in the tree (a DELETE inside a CTE counts), every
// relation, function, type and schema named, every setting touched. Facts depend on the text alone, never
// on the tenant, so they are cached by text and the per-tenant check stays a handful of set lookups.
import { loadModule, parseSync } from 'libpg-query';

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
type Obj = { [k: string]: Json };

/** Operation names as `allowed_operations` spells them. */
export type Operation = 'SELECT' | 'INSERT' | 'UPDATE' | 'DELETE' | 'MERGE' | 'COPY' | 'TRUNCATE' | 'CALL' | 'DO' | 'LOCK' | 'LISTEN' | 'NOTIFY';

export interface QualifiedName {
  schema: string | null;
  name: string;
}

export interface SettingChange {
  /** GUC name, lower-cased; 'all' for RESET ALL. */
  name: string;
  /** New value as a list of items (SET x TO a, b); null for RESET / DEFAULT / a value the proxy cannot read. */
  values: string[] | null;
  via: 'set' | 'reset' | 'set_config';
  /** SET LOCAL (or set_config(…, true)): ends with the transaction. */
  local: boolean;
}

export interface StatementFacts {
  /** Top-level node type, e.g. SelectStmt. */
  kind: string;
  operations: Set<Operation>;
  /** Creates, alters or drops objects (CREATE/ALTER/DROP/TRUNCATE/GRANT/COMMENT/SELECT INTO/CREATE TABLE AS…). */
  ddl: boolean;
  /** Changes data or objects: what read_only refuses. */
  writes: boolean;
  explain: { analyze: boolean } | null;
  /** Server-wide statements (roles, databases, extensions, ALTER SYSTEM…): need allow_system_access. */
  serverLevel: boolean;
  /** DO blocks and functions in procedural languages: their dynamic SQL cannot be checked. */
  procedural: boolean;
  /** COPY to or from a server file or program. */
  copyFile: boolean;
  relations: QualifiedName[];
  functions: QualifiedName[];
  /** Every schema named explicitly anywhere (relations, functions, types, column refs, CREATE SCHEMA…). */
  schemas: Set<string>;
  /** Database qualifiers (`db.schema.table`). */
  catalogs: Set<string>;
  settings: SettingChange[];
  /** SET ROLE / SET SESSION AUTHORIZATION (other than RESET). */
  changesRole: boolean;
  /** BEGIN READ WRITE / SET TRANSACTION READ WRITE. */
  readWriteTransaction: boolean;
  /** COMMIT, ROLLBACK (not TO a savepoint), PREPARE TRANSACTION and their prepared/chained forms. */
  endsTransaction: boolean;
  /** DISCARD ALL / DEALLOCATE ALL: the backend's prepared statements are gone afterwards. */
  dropsPrepared: boolean;
  /** A name whose schema the proxy could not see (nextval(some_expression), regclass from a non-literal). */
  opaqueNames: boolean;
  /** The facts read a literal's value (SET values, regclass literals, function bodies…): cache by exact text only. */
  literalsMatter: boolean;
  /** Session state that only lives on one backend (LISTEN, temp table, WITH HOLD cursor, session advisory lock, PREPARE). */
  pins: string | null;
}

/** Statement kinds that only read or touch session state: never DDL. */
const SESSION_KINDS = new Set([
  'TransactionStmt',
  'VariableSetStmt',
  'VariableShowStmt',
  'DiscardStmt',
  'ConstraintsSetStmt',
  'DeallocateStmt',
  'ExecuteStmt',
  'FetchStmt',
  'ClosePortalStmt',
]);

const DML_KINDS: Record<string, Operation> = {
  SelectStmt: 'SELECT',
  InsertStmt: 'INSERT',
  UpdateStmt: 'UPDATE',
  DeleteStmt: 'DELETE',
  MergeStmt: 'MERGE',
  CopyStmt: 'COPY',
  TruncateStmt: 'TRUNCATE',
  CallStmt: 'CALL',
  DoStmt: 'DO',
  LockStmt: 'LOCK',
  ListenStmt: 'LISTEN',
  UnlistenStmt: 'LISTEN',
  NotifyStmt: 'NOTIFY',
};

/** Statements whose effect is not confined to the tenant's schema or database. */
const SERVER_LEVEL_KINDS = new Set([
  'CreatedbStmt',
  'DropdbStmt',
  'AlterDatabaseStmt',
  'AlterDatabaseSetStmt',
  'AlterDatabaseRefreshCollStmt',
  'AlterSystemStmt',
  'CreateRoleStmt',
  'AlterRoleStmt',
  'AlterRoleSetStmt',
  'DropRoleStmt',
  'GrantRoleStmt',
  'ReassignOwnedStmt',
  'DropOwnedStmt',
  'CreateExtensionStmt',
  'AlterExtensionStmt',
  'AlterExtensionContentsStmt',
  'LoadStmt',
  'CreateTableSpaceStmt',
  'DropTableSpaceStmt',
  'AlterTableSpaceOptionsStmt',
  'AlterTableMoveAllStmt',
  'CreateEventTrigStmt',
  'AlterEventTrigStmt',
  'CreateFdwStmt',
  'AlterFdwStmt',
  'CreateForeignServerStmt',
  'AlterForeignServerStmt',
  'CreateUserMappingStmt',
  'AlterUserMappingStmt',
  'DropUserMappingStmt',
  'ImportForeignSchemaStmt',
  'CreateSubscriptionStmt',
  'AlterSubscriptionStmt',
  'DropSubscriptionStmt',
  'CreatePublicationStmt',
  'AlterPublicationStmt',
  'CheckPointStmt',
  'CreateConversionStmt',
  'CreateCastStmt',
  'CreateTransformStmt',
  'CreatePLangStmt',
  'CreateAmStmt',
  'AlterOwnerStmt',
  'SecLabelStmt',
  'VacuumStmt',
  'ClusterStmt',
  'ReindexStmt',
]);

/** Functions that name relations or sequences in a text argument. */
const NAME_IN_FIRST_ARG = new Set(['nextval', 'currval', 'setval', 'pg_get_serial_sequence']);
/** Fields that hold a dotted name as a list of String nodes. */
const NAME_LIST_FIELDS = new Set(['funcname', 'defnames', 'typeName', 'collname', 'opname', 'conversion_name', 'handler_name']);
const REG_TYPES = new Set(['regclass', 'regproc', 'regprocedure', 'regtype', 'regnamespace', 'regoper', 'regoperator', 'regconfig', 'regdictionary', 'regcollation']);

let ready: Promise<void> | null = null;

/** Loads the WASM parser once; call before the first classify(). */
export function loadParser(): Promise<void> {
  ready ??= loadModule();
  return ready;
}

export class ParseFailure extends Error {}

/**
 * Parses SQL (one or several statements) into one StatementFacts per statement. Throws ParseFailure on
 * a syntax error: the caller then lets PostgreSQL report it, since nothing unparsable can execute.
 */
export function classify(sql: string): StatementFacts[] {
  let tree: Obj;
  try {
    tree = parseSync(sql) as unknown as Obj;
  } catch (err) {
    throw new ParseFailure(err instanceof Error ? err.message : String(err));
  }
  const stmts = (tree.stmts as Json[] | undefined) ?? [];
  return stmts.map((s) => {
    const raw = ((s as Obj).stmt ?? {}) as Obj;
    const kind = Object.keys(raw)[0] ?? 'EmptyStmt';
    const facts = emptyFacts(kind);
    new Walker(facts).statement(kind, (raw[kind] ?? {}) as Obj);
    return facts;
  });
}

function emptyFacts(kind: string): StatementFacts {
  return {
    kind,
    operations: new Set(),
    ddl: false,
    writes: false,
    explain: null,
    serverLevel: false,
    procedural: false,
    copyFile: false,
    relations: [],
    functions: [],
    schemas: new Set(),
    catalogs: new Set(),
    settings: [],
    changesRole: false,
    readWriteTransaction: false,
    endsTransaction: false,
    dropsPrepared: false,
    opaqueNames: false,
    literalsMatter: kind === 'VariableSetStmt' || kind === 'CreateFunctionStmt' || kind === 'DoStmt' || kind === 'CopyStmt',
    pins: kind === 'ListenStmt' ? 'LISTEN' : kind === 'PrepareStmt' ? 'PREPARE' : null,
  };
}

function str(v: Json | undefined): string | null {
  return typeof v === 'string' ? v : null;
}

/** The text of a String node list: [{String:{sval}}…] → ['a', 'b']. */
function names(list: Json | undefined): string[] {
  if (!Array.isArray(list)) return [];
  const out: string[] = [];
  for (const n of list) {
    const s = ((n as Obj)?.String as Obj | undefined)?.sval;
    if (typeof s === 'string') out.push(s);
  }
  return out;
}

/** The string value of an A_Const (or a TypeCast of one), else null. */
function constString(node: Json | undefined): string | null {
  if (node === null || typeof node !== 'object' || Array.isArray(node)) return null;
  const c = (node.A_Const ?? ((node.TypeCast as Obj | undefined)?.arg as Obj | undefined)?.A_Const) as Obj | undefined;
  if (c === undefined) return null;
  const sval = (c.sval as Obj | undefined)?.sval;
  if (typeof sval === 'string') return sval;
  // Zero values are omitted from the JSON: {"ival": {}} is 0.
  if (c.ival !== undefined) return String((c.ival as Obj).ival ?? 0);
  if (c.fval !== undefined) return String((c.fval as Obj).fval ?? '0');
  if (c.boolval !== undefined) return (c.boolval as Obj).boolval === true ? 'on' : 'off';
  return null;
}

/**
 * Reads one name item starting at `i`: a double-quoted identifier ("" escapes a quote; case kept) or a
 * bare run up to `stop` (trimmed, lower-cased), as PostgreSQL's identifier rules have it. Returns null for
 * an unterminated quote.
 */
function readName(s: string, i: number, stop: string): [string, number] | null {
  if (s[i] !== '"') {
    let bare = '';
    while (i < s.length && s[i] !== stop) bare += s[i++];
    return [bare.trim().toLowerCase(), i];
  }
  let quoted = '';
  i++;
  for (;;) {
    if (i >= s.length) return null;
    if (s[i] === '"') {
      if (s[i + 1] !== '"') return [quoted, i + 1];
      quoted += '"';
      i += 2;
      continue;
    }
    quoted += s[i++];
  }
}

/** Splits a qualified name written as text ('acme.orders', '"My Schema".t') the way regclass input does. */
export function splitQualifiedText(text: string): string[] {
  const s = text.trim();
  const parts: string[] = [];
  let i = 0;
  for (;;) {
    const r = readName(s, i, '.');
    if (r === null) return [s]; // unterminated: one opaque name, which no allowed schema matches
    parts.push(r[0]);
    i = r[1];
    if (s[i] !== '.') return parts;
    i++;
  }
}

/** Splits a GUC list value given as text ('acme, "My Schema"') the way PostgreSQL's list parser does. */
export function splitListText(text: string): string[] {
  const out: string[] = [];
  let i = 0;
  while (i < text.length) {
    while (text[i] === ' ' || text[i] === '\t' || text[i] === ',') i++;
    if (i >= text.length) break;
    const r = readName(text, i, ',');
    if (r === null) {
      out.push(text.slice(i + 1));
      break;
    }
    out.push(r[0]);
    i = r[1];
  }
  return out;
}

class Walker {
  /** CTE names in the statement: an unqualified reference to one is not a table. */
  private readonly ctes = new Set<string>();

  constructor(private readonly f: StatementFacts) {}

  statement(kind: string, node: Obj): void {
    const f = this.f;
    this.classifyKind(kind, node);
    this.collectCtes(node);
    this.visit(kind, node);
    this.walk(node, kind);
    // De-duplicated by qualified name (max_tables_per_query counts distinct relations).
    f.relations = distinct(f.relations);
    f.functions = distinct(f.functions);
  }

  private classifyKind(kind: string, node: Obj): void {
    const f = this.f;
    if (SERVER_LEVEL_KINDS.has(kind)) {
      f.serverLevel = true;
      f.ddl = true;
      f.writes = true;
      return;
    }
    if (kind in DML_KINDS || SESSION_KINDS.has(kind) || kind === 'ExplainStmt' || kind === 'PrepareStmt' || kind === 'DeclareCursorStmt') return;
    // Everything else changes the schema: fail closed by treating unknown kinds as DDL.
    f.ddl = true;
    f.writes = true;
    if (kind === 'CreateFunctionStmt') this.createFunction(node);
    if (kind === 'CreateSchemaStmt') {
      const name = str(node.schemaname);
      if (name !== null) f.schemas.add(name);
    }
    if (kind === 'AlterObjectSchemaStmt') {
      const name = str(node.newschema);
      if (name !== null) f.schemas.add(name);
    }
  }

  /** SQL-language bodies are checked like any statement; procedural ones cannot be. */
  private createFunction(node: Obj): void {
    let language = 'sql';
    let body: string | null = null;
    for (const o of (node.options as Json[] | undefined) ?? []) {
      const d = (o as Obj).DefElem as Obj | undefined;
      if (d === undefined) continue;
      if (d.defname === 'language') language = (constString(d.arg) ?? ((d.arg as Obj)?.String as Obj | undefined)?.sval ?? 'sql') as string;
      if (d.defname === 'as') body = names(((d.arg as Obj)?.List as Obj | undefined)?.items)[0] ?? null;
    }
    if (language.toLowerCase() !== 'sql') {
      this.f.procedural = true;
      return;
    }
    if (body !== null) {
      try {
        for (const inner of classify(body)) mergeInto(this.f, inner);
      } catch {
        this.f.opaqueNames = true; // a body the parser cannot read cannot be vouched for
      }
    }
  }

  private collectCtes(node: Json): void {
    if (node === null || typeof node !== 'object') return;
    if (Array.isArray(node)) {
      for (const n of node) this.collectCtes(n);
      return;
    }
    const cte = node.CommonTableExpr as Obj | undefined;
    if (cte !== undefined && typeof cte.ctename === 'string') this.ctes.add(cte.ctename);
    for (const k in node) this.collectCtes(node[k]!);
  }

  /**
   * Descends the whole tree. Nodes typed as Node arrive wrapped ({"RangeVar": {...}}); fields typed as a
   * specific struct arrive bare (DeleteStmt.relation is a RangeVar without the wrapper), so bare structs are
   * recognised by shape, and name lists by the field that holds them.
   */
  private walk(node: Json, field: string): void {
    if (node === null || typeof node !== 'object') return;
    if (Array.isArray(node)) {
      if (NAME_LIST_FIELDS.has(field)) this.qualified(names(node), field === 'funcname');
      for (const n of node) this.walk(n, field);
      return;
    }
    const keys = Object.keys(node);
    if (keys.length === 1 && /^[A-Z]/.test(keys[0]!)) {
      const type = keys[0]!;
      const inner = node[type]!;
      if (inner !== null && typeof inner === 'object' && !Array.isArray(inner)) {
        this.visit(type, inner);
        this.walk(inner, type);
        return;
      }
    }
    if (typeof node.relname === 'string') this.rangeVar(node);
    else if (Array.isArray(node.names) && 'typemod' in node) this.qualified(names(node.names), false);
    for (const k of keys) this.walk(node[k]!, k);
  }

  /** Looks at one node by its type name; walk() descends into it afterwards. */
  private visit(type: string, n: Obj): void {
    const f = this.f;
    const op = DML_KINDS[type];
    if (op !== undefined) {
      f.operations.add(op);
      // COPY … TO only reads; COPY … FROM writes.
      if (op === 'COPY' ? n.is_from === true : op !== 'SELECT' && op !== 'LISTEN' && op !== 'NOTIFY' && op !== 'LOCK') f.writes = true;
      if (op === 'COPY' && (typeof n.filename === 'string' || n.is_program === true)) f.copyFile = true;
      if (op === 'TRUNCATE') f.ddl = true;
      if (op === 'DO') f.procedural = true;
      if (op === 'SELECT' && n.intoClause !== undefined) {
        f.ddl = true; // SELECT … INTO creates a table
        f.writes = true;
      }
    }
    switch (type) {
      case 'RangeVar':
        this.rangeVar(n);
        break;
      case 'List':
        // DROP/COMMENT/ALTER … name objects as lists of strings: [schema, name] when qualified.
        this.qualified(names(n.items), false, true);
        break;
      case 'DropStmt':
      case 'GrantStmt':
        if (n.removeType === 'OBJECT_SCHEMA' || n.objtype === 'OBJECT_SCHEMA' || n.targtype === 'ACL_TARGET_ALL_IN_SCHEMA') {
          for (const name of names(n.objects)) this.f.schemas.add(name);
        }
        break;
      case 'FuncCall':
        this.funcCall(n);
        break;
      case 'TypeName':
        this.qualified(names(n.names), false);
        break;
      case 'ObjectWithArgs':
        this.qualified(names(n.objname), true);
        break;
      case 'ColumnRef': {
        const fields = (n.fields as Json[] | undefined) ?? [];
        const parts = names(fields);
        // schema.table.column (3 parts, or 4 with the database)
        if (parts.length === fields.length && parts.length >= 3) this.qualified(parts.slice(0, -1), false);
        break;
      }
      case 'TypeCast':
        this.regCast(n);
        break;
      case 'ExplainStmt': {
        const analyze = ((n.options as Json[] | undefined) ?? []).some((o) => ((o as Obj).DefElem as Obj | undefined)?.defname === 'analyze');
        f.explain = { analyze: analyze || (f.explain?.analyze ?? false) };
        break;
      }
      case 'CreateTableAsStmt':
        f.ddl = true;
        f.writes = true;
        break;
      case 'VariableSetStmt':
        this.variableSet(n);
        break;
      case 'DiscardStmt':
        if (n.target === 'DISCARD_ALL') f.dropsPrepared = true;
        f.settings.push({ name: n.target === 'DISCARD_ALL' ? 'all' : 'discard', values: null, via: 'reset', local: false });
        break;
      case 'DeallocateStmt':
        // DEALLOCATE name drops one statement; only DEALLOCATE ALL empties the backend.
        if (n.isall === true) f.dropsPrepared = true;
        break;
      case 'DeclareCursorStmt':
        // CURSOR_OPT_HOLD: the cursor outlives its transaction, so it outlives a transaction-mode checkout.
        if (typeof n.options === 'number' && (n.options & 0x20) !== 0) f.pins ??= 'WITH HOLD cursor';
        break;
      case 'TransactionStmt':
        if (['TRANS_STMT_COMMIT', 'TRANS_STMT_ROLLBACK', 'TRANS_STMT_PREPARE', 'TRANS_STMT_COMMIT_PREPARED', 'TRANS_STMT_ROLLBACK_PREPARED'].includes(String(n.kind))) {
          f.endsTransaction = true;
        }
        for (const o of (n.options as Json[] | undefined) ?? []) {
          const d = (o as Obj).DefElem as Obj | undefined;
          if (d?.defname === 'transaction_read_only' && constString(d.arg) === '0') f.readWriteTransaction = true;
        }
        break;
      case 'CreateFunctionStmt':
        if (this.f.kind !== 'CreateFunctionStmt') this.createFunction(n);
        break;
      default:
        break;
    }
  }

  private rangeVar(n: Obj): void {
    const name = str(n.relname);
    if (name === null) return;
    if (n.relpersistence === 't') this.f.pins ??= 'temporary table';
    const schema = str(n.schemaname);
    const catalog = str(n.catalogname);
    if (catalog !== null) this.f.catalogs.add(catalog);
    if (schema !== null) this.f.schemas.add(schema);
    if (schema === null && this.ctes.has(name)) return;
    this.f.relations.push({ schema, name });
  }

  private funcCall(n: Obj): void {
    const parts = names(n.funcname);
    if (parts.length === 0) return;
    const name = parts[parts.length - 1]!.toLowerCase();
    this.qualified(parts, true);
    const args = (n.args as Json[] | undefined) ?? [];
    if (/^pg_(try_)?advisory_lock(_shared)?$/.test(name)) this.f.pins ??= 'session advisory lock';
    if (NAME_IN_FIRST_ARG.has(name) || name === 'set_config') this.f.literalsMatter = true;
    if (NAME_IN_FIRST_ARG.has(name)) {
      const text = constString(args[0]);
      if (text === null) this.f.opaqueNames = true;
      else this.qualified(splitQualifiedText(text), false, true);
    }
    if (name === 'set_config') {
      const setting = constString(args[0]);
      const value = constString(args[1]);
      this.f.settings.push({ name: setting === null ? '?' : setting.toLowerCase(), values: value === null ? null : splitListText(value), via: 'set_config', local: constString(args[2]) === 'on' });
    }
  }

  /** 'acme.orders'::regclass names a relation in a literal. */
  private regCast(n: Obj): void {
    const typeNames = names((n.typeName as Obj | undefined)?.names);
    const t = typeNames[typeNames.length - 1]?.toLowerCase();
    if (t === undefined || !REG_TYPES.has(t)) return;
    this.f.literalsMatter = true;
    const text = constString(n.arg);
    if (text === null) this.f.opaqueNames = true;
    else this.qualified(splitQualifiedText(text), false, t === 'regclass');
  }

  /**
   * Records schema (and database) qualifiers of a dotted name; for functions also the function itself.
   * pg_catalog on a function or type is not a schema reference worth checking: the parser itself writes
   * `int` as pg_catalog.int4, and built-in functions are checked by name instead.
   */
  private qualified(parts: string[], isFunction: boolean, isRelation = false): void {
    if (parts.length === 0) return;
    const schema = parts.length >= 2 ? parts[parts.length - 2]! : null;
    if (parts.length >= 3) this.f.catalogs.add(parts[parts.length - 3]!);
    if (schema !== null && (isRelation || schema !== 'pg_catalog')) this.f.schemas.add(schema);
    if (isFunction) this.f.functions.push({ schema, name: parts[parts.length - 1]!.toLowerCase() });
  }

  private variableSet(n: Obj): void {
    const f = this.f;
    // Its values are literals the facts record, wherever it sits (ALTER FUNCTION … SET, ALTER ROLE … SET too).
    f.literalsMatter = true;
    const kind = str(n.kind);
    const name = (str(n.name) ?? '').toLowerCase();
    if (kind === 'VAR_RESET_ALL') {
      f.settings.push({ name: 'all', values: null, via: 'reset', local: false });
      return;
    }
    if (name === 'role' || name === 'session_authorization') {
      if (kind !== 'VAR_RESET' && kind !== 'VAR_SET_DEFAULT') f.changesRole = true;
      return;
    }
    if (kind === 'VAR_SET_MULTI') {
      // SET TRANSACTION … / SET SESSION CHARACTERISTICS AS TRANSACTION …
      for (const a of (n.args as Json[] | undefined) ?? []) {
        const d = (a as Obj).DefElem as Obj | undefined;
        if (d?.defname === 'transaction_read_only' && constString(d.arg) === '0') f.readWriteTransaction = true;
      }
      return;
    }
    if (kind === 'VAR_RESET' || kind === 'VAR_SET_DEFAULT') {
      f.settings.push({ name, values: null, via: 'reset', local: n.is_local === true });
      return;
    }
    const args = (n.args as Json[] | undefined) ?? [];
    const values = args.map((a) => constString(a) ?? names(((a as Obj)?.ColumnRef as Obj | undefined)?.fields)[0] ?? null);
    f.settings.push({ name, values: values.some((v) => v === null) ? null : (values as string[]), via: 'set', local: n.is_local === true });
  }
}

function distinct(list: QualifiedName[]): QualifiedName[] {
  const seen = new Set<string>();
  return list.filter((r) => {
    const k = `${r.schema ?? ''}.${r.name}`;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

function mergeInto(into: StatementFacts, from: StatementFacts): void {
  for (const o of from.operations) into.operations.add(o);
  into.ddl ||= from.ddl;
  into.writes ||= from.writes;
  into.serverLevel ||= from.serverLevel;
  into.procedural ||= from.procedural;
  into.copyFile ||= from.copyFile;
  into.relations.push(...from.relations);
  into.functions.push(...from.functions);
  for (const s of from.schemas) into.schemas.add(s);
  for (const c of from.catalogs) into.catalogs.add(c);
  into.settings.push(...from.settings);
  into.changesRole ||= from.changesRole;
  into.opaqueNames ||= from.opaqueNames;
  into.pins ??= from.pins;
  into.literalsMatter = true; // a function body is a literal
}
