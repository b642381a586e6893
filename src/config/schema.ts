// config/ owns proxy.toml: its schema (every key, its type, default and allowed values), the checks that
// span keys, and the list of keys that load but are not enforced yet. Unknown keys are errors: a key that
// loads and does nothing is a defect.
import { z } from 'zod';

const secs = z.number().int().nonnegative();
const posInt = z.number().int().positive();

/** "host:port" or "[v6]:port". */
const address = z.string().regex(/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'expected "host:port"');

const identifier = z
  .string()
  .min(1)
  .max(63)
  .regex(/^[A-Za-z0-9_][A-Za-z0-9_$-]*$/, 'expected letters, digits, "_", "-" or "$" (at most 63 characters)');

export const AuthSchema = z.strictObject({
  /** What the proxy asks clients for when it holds a plain or md5 secret for the role. */
  auth_type: z.enum(['scram-sha-256', 'md5']).default('scram-sha-256'),
  /** PgBouncer userlist.txt format: `"role" "secret"` per line; secret is plain, md5… or SCRAM-SHA-256$…. */
  auth_file: z.string().min(1).optional(),
  /** Role the proxy logs in as to run auth_query; its own secret must be in auth_file. */
  auth_user: z.string().min(1).optional(),
  auth_query: z
    .string()
    .min(1)
    .default(
      "SELECT rolname, CASE WHEN rolvaliduntil IS NULL OR rolvaliduntil > now() THEN rolpassword END FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin",
    ),
  /** Database auth_query runs in. */
  auth_database: z.string().min(1).default('postgres'),
});

export const PoolSchema = z.strictObject({
  min_connections: secs.default(0),
  max_connections: posInt.default(100),
  idle_timeout_secs: secs.default(300),
  max_lifetime_secs: secs.default(3600),
  acquire_timeout_secs: posInt.default(10),
  test_on_acquire: z.boolean().default(true),
});

export const PoolModeSchema = z.strictObject({
  mode: z.enum(['session', 'transaction', 'statement']).default('transaction'),
  max_pool_size: posInt.default(100),
  min_idle: secs.default(0),
  idle_timeout_secs: secs.default(600),
  max_lifetime_secs: secs.default(3600),
  acquire_timeout_secs: posInt.default(5),
  reset_query: z.string().default('DISCARD ALL'),
  prepared_statement_mode: z.enum(['track', 'passthrough']).default('track'),
  /** Named prepared statements a client may keep at once in track mode. */
  max_prepared_statements: posInt.default(1000),
});

export const LoadBalancerSchema = z.strictObject({
  read_strategy: z.enum(['round_robin', 'least_connections', 'latency']).default('round_robin'),
  read_write_split: z.boolean().default(false),
  latency_threshold_ms: posInt.default(100),
});

export const HealthSchema = z.strictObject({
  check_interval_secs: posInt.default(5),
  check_timeout_secs: posInt.default(3),
  failure_threshold: posInt.default(3),
  success_threshold: posInt.default(1),
  check_query: z.string().default('SELECT 1'),
});

export const NodeSchema = z.strictObject({
  name: z.string().min(1),
  host: z.string().min(1),
  port: z.number().int().min(1).max(65535).default(5432),
  role: z.enum(['primary', 'standby']),
  weight: z.number().int().min(0).default(100),
  enabled: z.boolean().default(true),
});

export const IsolationSchema = z.strictObject({
  strategy: z.enum(['schema', 'database']),
  database_name: z.string().min(1).max(63).optional(),
  schema_name: z.string().min(1).max(63).optional(),
});

export const TenantPoolSchema = z.strictObject({
  max_connections: posInt.default(20),
  min_idle: secs.optional(),
  dedicated_pool: z.boolean().default(false),
});

export const RateLimitsSchema = z.strictObject({
  qps_limit: posInt.optional(),
  max_connections: posInt.optional(),
  max_query_duration: posInt.optional(),
  max_result_size: posInt.optional(),
  max_rows_per_query: posInt.optional(),
  burst_multiplier: z.number().min(1).default(1),
});

export const OPERATIONS = [
  'SELECT',
  'INSERT',
  'UPDATE',
  'DELETE',
  'MERGE',
  'COPY',
  'TRUNCATE',
  'CALL',
  'DO',
  'LOCK',
  'LISTEN',
  'NOTIFY',
] as const;

export const PermissionsSchema = z.strictObject({
  allowed_operations: z.array(z.enum(OPERATIONS)).default(['SELECT', 'INSERT', 'UPDATE', 'DELETE']),
  read_only: z.boolean().default(false),
  allow_ddl: z.boolean().default(false),
  allow_explain: z.boolean().default(true),
  allow_system_access: z.boolean().default(false),
  max_tables_per_query: posInt.optional(),
});

export const TenantSchema = z.strictObject({
  id: identifier,
  name: z.string().optional(),
  isolation: IsolationSchema,
  pool: TenantPoolSchema.prefault({}),
  rate_limits: RateLimitsSchema.optional(),
  permissions: PermissionsSchema.optional(),
});

/** Settings given to tenants created on the fly (auto_create_tenants) and to unknown tenants let through. */
export const TenantDefaultsSchema = z.strictObject({
  isolation: IsolationSchema.optional(),
  pool: TenantPoolSchema.prefault({}),
  rate_limits: RateLimitsSchema.optional(),
  permissions: PermissionsSchema.optional(),
});

export const JWT_ALGORITHMS = ['HS256', 'HS384', 'HS512', 'RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA'] as const;

/** How JWTs are verified (wire logins with method = "jwt_claim", HTTP requests with identify_by = "jwt_claim"). */
export const JwtSchema = z.strictObject({
  /** Top-level claim that holds the tenant id. */
  claim: z.string().min(1).default('tenant_id'),
  /** Shared secret for HMAC tokens (HS256/384/512). */
  secret: z.string().min(32, 'use at least 32 characters (256 bits) for an HMAC secret').optional(),
  /** PEM public key or certificate (RSA, EC or Ed25519). */
  public_key_file: z.string().min(1).optional(),
  /** A JWKS document ({"keys": [...]}); the key is picked by the token's `kid`. */
  jwks_file: z.string().min(1).optional(),
  issuer: z.string().min(1).optional(),
  audience: z.string().min(1).optional(),
  clock_skew_secs: secs.default(30),
  /** Allow-list; `none` is never accepted. Default: the algorithms the configured key can verify. */
  algorithms: z.array(z.enum(JWT_ALGORITHMS)).min(1).optional(),
  /** Backend roles a token holder may log in as (wire logins; required with method = "jwt_claim"). */
  allowed_roles: z.array(z.string().min(1)).min(1).optional(),
});

export const IdentificationSchema = z.strictObject({
  method: z.enum(['username_prefix', 'database_name', 'jwt_claim', 'header']).default('username_prefix'),
  separator: z.string().min(1).max(8).default('.'),
  jwt: JwtSchema.optional(),
});

export const MultiTenancySchema = z.strictObject({
  enabled: z.boolean().default(true),
  allow_unknown_tenants: z.boolean().default(false),
  auto_create_tenants: z.boolean().default(false),
  max_tenants: posInt.default(1000),
  cross_tenant_analytics: z.boolean().default(false),
  identification: IdentificationSchema.prefault({}),
  defaults: TenantDefaultsSchema.optional(),
  tenants: z.array(TenantSchema).default([]),
});

/** Client-side TLS: the certificate the proxy presents to PostgreSQL clients (and, if asked, HTTP clients). */
export const TlsSchema = z.strictObject({
  cert_file: z.string().min(1).optional(),
  key_file: z.string().min(1).optional(),
  /** disable: answer SSLRequest 'N'; allow: TLS when the client asks; require: plaintext startups are refused. */
  mode: z.enum(['disable', 'allow', 'require']).default('allow'),
});

/** TLS from the proxy to PostgreSQL. */
export const BackendTlsSchema = z.strictObject({
  mode: z.enum(['disable', 'prefer', 'require', 'verify-full']).default('disable'),
  /** CA bundle (PEM) that must have signed the server's certificate; with verify-full, system CAs otherwise. */
  ca_file: z.string().min(1).optional(),
});

export const ApiKeySchema = z.strictObject({
  key: z.string().min(16, 'use at least 16 characters'),
  tenants: z.array(identifier).min(1),
});

/** The HTTP SQL endpoint: POST /v1/query and /v1/transaction. */
export const HttpGatewaySchema = z.strictObject({
  listen_address: address,
  identify_by: z.enum(['header', 'jwt_claim']).default('header'),
  tenant_header: z.string().regex(/^[A-Za-z0-9-]+$/, 'expected an HTTP header name').default('X-Tenant-Id'),
  api_keys: z.array(ApiKeySchema).default([]),
  /** Backend role requests run as; its secret comes from [auth] (see docs/configuration.md). */
  role: z.string().min(1),
  max_body_bytes: posInt.default(1_048_576),
  /** Cap on a response's row data: results are built in memory, so this bounds what one request can hold. */
  max_response_bytes: posInt.default(10_485_760),
  request_timeout_secs: posInt.default(30),
  /** Accept credentials over plain HTTP from non-loopback clients (only behind a TLS-terminating proxy). */
  allow_plaintext_remote: z.boolean().default(false),
  /** Serve HTTPS with [tls]'s certificate. */
  tls: z.boolean().default(false),
});

export const ConfigSchema = z.strictObject({
  listen_address: address.default('0.0.0.0:6432'),
  admin_address: address.optional(),
  /** When set, every admin route but /health and /ready needs `Authorization: Bearer <admin_token>`. */
  admin_token: z.string().min(16, 'use at least 16 characters').optional(),
  /** Serve the admin API over HTTPS with [tls]'s certificate. */
  admin_tls: z.boolean().default(false),
  /** SIGTERM/SIGINT: how long in-flight transactions may finish before clients are closed with 57P01. */
  shutdown_timeout_secs: secs.default(30),
  log_level: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  /**
   * How relayed bytes move once a connection is logged in: "native" (native/fastio.c: read(2)/write(2) on
   * the socket, no Node stream layer), "node" (Node's net.Socket), or "auto" (native when built).
   * TLS connections always use Node's TLS sockets.
   */
  socket_layer: z.enum(['auto', 'native', 'node']).default('auto'),
  tr_enabled: z.boolean().default(false),
  tr_mode: z.enum(['session', 'transaction']).default('session'),
  write_timeout_secs: posInt.default(30),
  auth: AuthSchema.optional(),
  pool: PoolSchema.prefault({}),
  pool_mode: PoolModeSchema.prefault({}),
  load_balancer: LoadBalancerSchema.optional(),
  health: HealthSchema.optional(),
  nodes: z.array(NodeSchema).min(1, 'at least one [[nodes]] entry with role = "primary" is required'),
  multi_tenancy: MultiTenancySchema.prefault({}),
  tls: TlsSchema.optional(),
  backend_tls: BackendTlsSchema.optional(),
  http_gateway: HttpGatewaySchema.optional(),
});

export type Config = z.output<typeof ConfigSchema>;
export type TenantConfig = z.output<typeof TenantSchema>;
export type TenantDefaults = z.output<typeof TenantDefaultsSchema>;
export type IsolationConfig = z.output<typeof IsolationSchema>;
export type TenantPoolConfig = z.output<typeof TenantPoolSchema>;
export type NodeConfig = z.output<typeof NodeSchema>;
export type PoolMode = Config['pool_mode']['mode'];
export type JwtConfig = z.output<typeof JwtSchema>;
export type HttpGatewayConfig = z.output<typeof HttpGatewaySchema>;
