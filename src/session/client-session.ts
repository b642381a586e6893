// session/ owns a client's life: StartupMessage → authentication → ReadyForQuery → relay → Terminate.
// A byte from the client goes: framer → inbox → (needs a backend? checkout from the tenant's pool and bring
// it in line) → forwardClientMessage → backend. A byte from the backend goes: framer → onServerMessage
// (expect queue: synthesize, drop or forward) → client, and at ReadyForQuery with nothing in flight the
// backend goes back to its pool (transaction/statement mode).
import { randomBytes } from 'node:crypto';
import { Socket } from 'node:net';
import { TLSSocket, type SecureContext } from 'node:tls';
import type { Logger } from 'pino';
import type { CredentialStore } from '../auth/credentials.js';
import { TokenRefused, type JwtVerifier } from '../auth/jwt.js';
import { md5Matches, md5Secret } from '../auth/md5.js';
import { cachedDerive, mockScramKeys, ScramError, ScramServerExchange, type ScramKeys } from '../auth/scram.js';
import type { Config } from '../config/schema.js';
import { adoptSocket, turnNow, type ByteStream } from '../io/native-socket.js';
import { MessageFramer, ProtocolViolation, StartupFramer, type FrameSink } from '../protocol/framer.js';
import { isLoopback } from '../protocol/tls.js';
import {
  AuthCode,
  authentication,
  authenticationSASL,
  backendKeyData,
  CANCEL_REQUEST_CODE,
  CLOSE_COMPLETE,
  closeStatement,
  decodeErrorFields,
  decodeStartupParams,
  errorResponse,
  execute,
  GSSENC_REQUEST_CODE,
  Msg,
  negotiateProtocolVersion,
  PARSE_COMPLETE,
  parameterStatus,
  parse,
  query,
  PROTOCOL_3_0,
  quoteLiteral,
  readCString,
  readyForQuery,
  SSL_REQUEST_CODE,
  type ErrorFields,
  type TxStatus,
} from '../protocol/messages.js';
import type { PoolManager } from '../pool/manager.js';
import { AcquireTimeout, type Pool } from '../pool/pool.js';
import { BackendError, BackendUnavailable, ServerConnection, type ServerRelay } from '../pool/server-connection.js';
import { IdentifyError, type Identity, type Tenant, type TenantRegistry } from '../tenancy/registry.js';
import type { ProxyMetrics } from '../admin/metrics.js';
import type { FactsCache } from '../policy/cache.js';
import { ParseFailure, type StatementFacts } from '../policy/classify.js';
import { checkStatement, type Rejection } from '../policy/check.js';
import type { CancelRegistry } from './cancel.js';
import { Expect, ExpectQueue, storeAt } from './expect.js';
import { bindStatementSpan, isStatementTarget, parseNameSpan, renameIn, serverStatementName, targetSpan, type TrackedStatement } from './prepared.js';
import { sessionParameters, StartupParamError, TRACKED_PARAMETERS } from './startup-params.js';

/** Everything a session needs from the proxy around it. */
export interface SessionContext {
  config: Config;
  credentials: CredentialStore;
  tenants: TenantRegistry;
  pools: PoolManager;
  cancels: CancelRegistry;
  log: Logger;
  sessions: Set<ClientSession>;
  /** Sessions with a statement running under a max_query_duration. */
  running: Set<ClientSession>;
  /** Statement classifications, shared by all sessions. */
  statements: FactsCache;
  metrics: ProxyMetrics;
  /** Opens a short-lived connection to send a CancelRequest to a backend. */
  sendCancel(server: ServerConnection): void;
  shuttingDown: boolean;
  /** [tls]'s certificate, re-read on reload; null when TLS is off. */
  tls: SecureContext | null;
  /** [multi_tenancy.identification.jwt], rebuilt on reload; null when not configured. */
  jwt: JwtVerifier | null;
  /** socket_layer as it took effect at start (native and built): move logged-in plaintext clients onto it. */
  nativeSocket: boolean;
}

/**
 * What a session talks to its client over: a TCP socket, the TLSSocket it becomes after SSLRequest, or
 * the in-process stream of an HTTP gateway request.
 */
export type ClientTransport = ByteStream;

const LOGIN_TIMEOUT_MS = 60_000;
/** Longer statements are refused for tenants whose statements are checked: parsing must stay bounded. */
const MAX_CHECKED_SQL = 1 << 20;
/** Sent in place of a refused statement: fails at once in the parser, touching nothing. */
const REFUSED_SQL = 'heliosproxy refused this statement';
/** Backend statements kept per connection before the least recently used is closed. */
const SERVER_STATEMENT_CACHE = 500;

let nextSessionId = 1;

/** SQL that can drop the proxy's search_path or session settings: re-apply them at the next request. */
// A heuristic on raw text until statements are classified by PostgreSQL's parser: it may fire on a comment
// (costing one extra SET round trip), never miss the plain forms.
const RESETS_STATE = /\b(discard\s+all|reset\s+("?)(all|search_path|role|session)\2|set\s+(local\s+|session\s+)?("?)(role|session\s+authorization|search_path)\5|set_config)\b|"(search_path|role)"/i;
const CHANGES_SCHEMA = /\b(alter|drop|create|truncate)\s/i;
const DROPS_STATEMENTS = /\b(discard\s+all|deallocate\s+(prepare\s+)?all)\b/i;
/** A whole statement that is `DEALLOCATE [PREPARE] name` (the name as written: quoted or not). */
const DEALLOCATE_ONE = /^\s*deallocate\s+(?:prepare\s+)?(?:"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*$/i;
const PINS = /\b(listen|pg_(?:try_)?advisory_lock(?:_shared)?|create\s+(?:local\s+|global\s+)?temp(?:orary)?|with\s+hold|prepare)\b/i;
/** Settings a client SET may carry from backend to backend (names as the parser gives them). */
const FOLLOWING_SETTING = /^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$/;
/** Handled elsewhere: the proxy's own (search_path), refused (role), or not a GUC (RESET ALL, DISCARD). */
const NOT_FOLLOWED = new Set(['search_path', 'role', 'session_authorization', 'all', 'discard', 'transaction_isolation', 'transaction_read_only', 'transaction_deferrable']);
const RESETS_ALL = /\b(discard\s+all|reset\s+all)\b/i;
const RESETS_ONE = /\breset\s+([a-z_]+)\b/gi;


type Phase = 'startup' | 'auth' | 'ready' | 'closed';

export class ClientSession implements ServerRelay {
  readonly id = nextSessionId++;
  private phase: Phase = 'startup';
  private log: Logger;

  private readonly startupFramer = new StartupFramer();
  private readonly framer = new MessageFramer();
  private readonly loginTimer: NodeJS.Timeout;

  // authentication: messages are awaited one at a time
  private authInbox: Buffer[] = [];
  private authWaiter: ((m: Buffer) => void) | null = null;

  identity: Identity | null = null;
  private countedClient = false;
  /** identity.tenant, once the login has confirmed it (the relay's hot path reads it per row). */
  private tenant!: Tenant;
  private latency: { observe(seconds: number): void } | null = null;
  /** When the request now in flight reached the proxy (turnNow(), ms); measured to its ReadyForQuery. */
  private requestStartedAt = 0;
  private desired = new Map<string, string>();
  private cancelKey: { pid: number; secret: number } | null = null;

  // backend
  private pool: Pool | null = null;
  private server: ServerConnection | null = null;
  private readonly expect = new ExpectQueue();
  private txStatus: TxStatus = 'I';
  /** Set by a statement that may have dropped the proxy's SETs; checked when the next request starts. */
  private reapply = false;
  private dropStatementsAtReady = false;
  /** The request ran DDL: prepared statements on the tenant's backends may now have stale result shapes. */
  private ddlAtReady = false;
  private reapplyAtReady = false;
  /** Startup settings RESET/DISCARD ALL brought back to the server default: restored at ReadyForQuery. */
  private restoreAtReady: Set<string> | 'all' | null = null;
  /** Extended-protocol messages went out since the last Sync: the backend is inside an implicit transaction. */
  private awaitingSync = false;
  /** The backend is in COPY FROM STDIN: it ignores Sync and Flush until CopyDone/CopyFail. */
  private copyIn = false;
  private clientTerminated = false;
  /** The message at this inbox index has been judged (a message waiting for a backend is judged once). */
  private judgedIndex = -1;
  private refusal: Rejection | null = null;
  private judgedFacts: StatementFacts[] | null = null;
  private skippingUntilSync = false;
  /** When the statement now running started (turnNow(), ms), 0 when none; watched against max_query_duration. */
  private runningSince = 0;
  /** Why the proxy itself cancelled the running statement, so its 57014 can be reworded. */
  private cancelReason: 'duration' | 'result' | null = null;
  private rowCount = 0;
  private byteCount = 0;
  /** A result limit was hit: rows are dropped and the statement's end becomes the proxy's error. */
  private resultTripped = false;
  /** The backend kept going after the proxy turned a statement into an error: drop its output to ReadyForQuery. */
  private droppingUntilReady = false;
  /**
   * Why this client keeps its backend between transactions (LISTEN, temp table, WITH HOLD cursor, session
   * advisory lock, SQL PREPARE): that state lives on one backend, so transaction mode pins the client to it
   * until it disconnects (then the backend is reset like a session-mode one).
   */
  private pinned: string | null = null;
  /** The Query in flight runs inside a BEGIN the proxy sent (see mustWrap). */
  private wrappedQuery = false;
  private pinAtReady: string | null = null;
  /** Session-level SETs of the request in flight: they follow the client once the request succeeds. */
  private pendingSets: { name: string; value: string | null }[] = [];
  private requestFailed = false;
  /** The backend's own FATAL went to the client: its connection is ending, and the client knows why. */
  private backendFatalRelayed = false;
  /** GUCs as the client was given them at startup (RESET returns to these, as in PostgreSQL). */
  private startupParams = new Map<string, string>();
  /** ParameterStatus values the client has been told, so a re-synced backend's changes reach it too. */
  private readonly clientParams = new Map<string, string>();

  // client messages not yet forwarded (waiting for a backend), kept as offsets into the chunks that carried them
  // (the arrays are reused: entries from inHead to inTail are live; truncating them costs a runtime call)
  private readonly inBufs: (Buffer | null)[] = [];
  private readonly inStarts: number[] = [];
  private readonly inEnds: number[] = [];
  private inHead = 0;
  private inTail = 0;
  private blocked = false;

  // runs of consecutive bytes to forward unchanged, written as one subarray
  private toServerBuf: Buffer | null = null;
  private toServerStart = 0;
  private toServerEnd = 0;
  private toClientBuf: Buffer | null = null;
  private toClientStart = 0;
  private toClientEnd = 0;

  /** Client statement name → backend statement (track mode only). */
  private readonly statements = new Map<string, TrackedStatement>();

  private readonly inboxSink: FrameSink = {
    message: (buf, start, end) => {
      const i = this.inTail++;
      storeAt(this.inBufs, i, buf);
      storeAt(this.inStarts, i, start);
      storeAt(this.inEnds, i, end);
    },
    batchEnd: () => this.drainInbox(),
  };

  private readonly authSink: FrameSink = {
    message: (buf, start, end) => {
      const msg = buf.subarray(start, end);
      if (this.authWaiter !== null) {
        const w = this.authWaiter;
        this.authWaiter = null;
        w(msg);
      } else this.authInbox.push(msg);
    },
    batchEnd: () => {},
  };

  /** Whether the client's bytes travel over TLS (after SSLRequest), which lets cleartext secrets through. */
  private encrypted = false;
  private readonly onDataListener = (chunk: Buffer): void => this.onData(chunk);

  /**
   * `preauthenticated`: the HTTP gateway has already identified and authorized the request; the
   * StartupMessage then skips authentication and everything else is as for a wire client.
   */
  constructor(
    public socket: ClientTransport,
    private readonly ctx: SessionContext,
    private readonly preauthenticated: Identity | null = null,
  ) {
    this.log = ctx.log.child({ conn: this.id, client: `${socket.remoteAddress}:${socket.remotePort}` });
    this.listenTo(socket);
    this.loginTimer = setTimeout(() => {
      if (this.phase === 'ready') return;
      this.fatal({ code: '08P01', message: 'login timed out' });
      // A client stalled mid TLS handshake never reads the FATAL, and a graceful end would wait on it.
      setTimeout(() => this.socket.destroy(), 1000).unref();
    }, LOGIN_TIMEOUT_MS);
    this.loginTimer.unref();
  }

  // ── bytes from the client ──────────────────────────────────────────────────────────

  private onData(chunk: Buffer): void {
    try {
      if (this.phase === 'ready') this.framer.feed(chunk, this.inboxSink);
      else if (this.phase === 'auth') this.framer.feed(chunk, this.authSink);
      else if (this.phase === 'startup') {
        this.startupFramer.push(chunk);
        this.pumpStartup();
      }
    } catch (err) {
      this.protocolError(err);
    }
  }

  /** Ends the session over bad input (08P01) or, never silently, over a bug of the proxy's own (XX000). */
  private protocolError(err: unknown): void {
    if (err instanceof ProtocolViolation) {
      this.log.warn({ err: err.message }, 'protocol violation');
      this.fatal({ code: '08P01', message: err.message });
      return;
    }
    this.log.error({ err: err instanceof Error ? err.stack : String(err) }, 'internal error while handling a client message');
    this.fatal({ code: 'XX000', message: 'internal error in the proxy; the connection is closed' });
  }

  private pumpStartup(): void {
    for (;;) {
      if (this.phase !== 'startup') return;
      const msg = this.startupFramer.next();
      if (msg === null) return;
      const code = msg.readInt32BE(4);
      if (code === SSL_REQUEST_CODE && this.ctx.tls !== null && !this.encrypted && this.preauthenticated === null) {
        this.startTls(this.ctx.tls);
        return;
      }
      if (code === SSL_REQUEST_CODE || code === GSSENC_REQUEST_CODE) {
        // 'N' tells the client to go on in plaintext (or, with sslmode=require, to give up).
        this.socket.write('N');
        continue;
      }
      if (code === CANCEL_REQUEST_CODE) {
        if (msg.length === 16) this.ctx.cancels.cancel(msg.readInt32BE(8), msg.readInt32BE(12));
        this.phase = 'closed';
        this.socket.destroy();
        return;
      }
      if (code >> 16 !== 3) {
        this.fatal({ code: '0A000', message: `unsupported frontend protocol ${code >> 16}.${code & 0xffff}: server supports 3.0` });
        return;
      }
      if (!this.encrypted && this.preauthenticated === null && this.ctx.config.tls?.mode === 'require') {
        this.fatal({ code: '28000', message: 'this proxy accepts only TLS connections', hint: 'Connect with sslmode=require (or verify-ca/verify-full).' });
        return;
      }
      const rest = this.startupFramer.takeRest();
      this.phase = 'auth';
      this.startSession(msg, code).catch((err: unknown) => this.loginFailed(err));
      if (rest.length > 0) this.framer.feed(rest, this.authSink);
      return;
    }
  }

  /**
   * Answers SSLRequest with 'S' and hands the socket to TLS; the StartupMessage then arrives encrypted.
   * Bytes already buffered behind the SSLRequest were sent in plaintext before the handshake, so could
   * come from a man in the middle (CVE-2021-23214): the connection is refused instead.
   */
  private startTls(context: SecureContext): void {
    if (this.startupFramer.takeRest().length > 0) {
      this.fatal({ code: '08P01', message: 'received unencrypted data after SSL request' });
      return;
    }
    // Only accepted TCP sockets reach here: the HTTP gateway's in-process streams are preauthenticated.
    const raw = this.socket;
    if (!(raw instanceof Socket)) throw new Error('SSLRequest on a transport that is not a TCP socket');
    raw.off('data', this.onDataListener);
    raw.write('S');
    const secure = new TLSSocket(raw, { isServer: true, secureContext: context });
    this.socket = secure;
    this.encrypted = true;
    secure.on('data', this.onDataListener);
    secure.on('error', (err) => {
      this.log.info({ err: err.message }, 'TLS handshake or stream failed');
      secure.destroy();
    });
    secure.on('close', () => this.cleanup());
  }

  // ── startup and authentication ─────────────────────────────────────────────────────

  private async startSession(msg: Buffer, code: number): Promise<void> {
    const params = decodeStartupParams(msg);
    const unsupported = [...params.keys()].filter((k) => k.startsWith('_pq_.'));
    if (code !== PROTOCOL_3_0 || unsupported.length > 0) this.socket.write(negotiateProtocolVersion(0, unsupported));
    if (this.ctx.shuttingDown) throw new LoginRefused({ code: '57P01', message: 'the proxy is shutting down' });

    const user = params.get('user');
    if (user === undefined || user === '') throw new LoginRefused({ code: '28000', message: 'no PostgreSQL user name specified in startup packet' });
    const byToken = this.preauthenticated === null && this.ctx.config.multi_tenancy.enabled && this.ctx.config.multi_tenancy.identification.method === 'jwt_claim';
    let identity: Identity;
    try {
      if (this.preauthenticated !== null) identity = this.preauthenticated;
      else if (byToken) identity = await this.tokenLogin(user, params.get('database'));
      else if (this.ctx.config.multi_tenancy.enabled && this.ctx.config.multi_tenancy.identification.method === 'header') {
        throw new LoginRefused({ code: '28000', message: 'tenants are identified by HTTP header on this proxy: use the HTTP SQL endpoint' });
      } else identity = this.ctx.tenants.identify(user, params.get('database'));
    } catch (err) {
      if (err instanceof IdentifyError) throw new LoginRefused({ code: err.code, message: err.message, ...(err.detail ? { detail: err.detail } : {}) });
      throw err;
    }
    try {
      this.desired = sessionParameters(params);
      this.startupParams = new Map(this.desired);
    } catch (err) {
      if (err instanceof StartupParamError) throw new LoginRefused({ code: '08P01', message: err.message });
      throw err;
    }
    this.identity = identity;
    this.log = this.log.child({ tenant: identity.tenant.id, user });
    this.pool = this.ctx.pools.poolFor(identity.tenant, identity.role);

    const verified = this.preauthenticated !== null || byToken ? null : await this.authenticate(identity);
    if (this.cleanedUp) {
      // The client left while its login was being checked: nothing may be counted or held for it.
      if (verified !== null) this.pool.release(verified, true, identity.tenant);
      return;
    }
    try {
      identity.tenant = this.ctx.tenants.confirm(identity.tenant);
    } catch (err) {
      if (verified !== null) this.pool.release(verified, true, identity.tenant);
      if (err instanceof IdentifyError) throw new LoginRefused({ code: err.code, message: err.message });
      throw err;
    }
    const tenant = identity.tenant;
    this.tenant = tenant;
    if (tenant.maxClients !== null && tenant.clients >= tenant.maxClients) {
      if (verified !== null) this.pool.release(verified, true, tenant);
      tenant.stats.rejections.connection_cap++;
      throw new LoginRefused({ code: '53300', message: `too many connections for tenant "${tenant.id}"`, detail: `max_connections is ${tenant.maxClients}.` });
    }
    if (tenant.readOnly) {
      // Belt and braces: PostgreSQL itself refuses writes the classifier cannot see (volatile functions).
      this.desired.set('default_transaction_read_only', 'on');
      this.startupParams.set('default_transaction_read_only', 'on');
    }
    tenant.clients++;
    this.countedClient = true;
    this.latency = this.ctx.metrics.latencyOf(tenant);
    const server = verified ?? (await this.acquireServer());
    try {
      await this.bringInLine(server);
    } catch (err) {
      this.pool.release(server, false, tenant);
      throw err;
    }
    if (this.cleanedUp) {
      this.pool.release(server, true, tenant);
      return;
    }

    this.cancelKey = this.ctx.cancels.register(this);
    const out: Buffer[] = [authentication(AuthCode.Ok)];
    for (const [name, value] of server.params) {
      out.push(parameterStatus(name, value));
      this.clientParams.set(name, value);
    }
    out.push(backendKeyData(this.cancelKey.pid, this.cancelKey.secret), readyForQuery('I'));
    this.socket.write(Buffer.concat(out));
    clearTimeout(this.loginTimer);
    if (this.ctx.nativeSocket) this.adoptNativeSocket();
    if (this.socket.destroyed) {
      this.pool.release(server, true, tenant);
      return;
    }
    this.attach(server);
    if (this.ctx.config.pool_mode.mode !== 'session') this.releaseServer(true);
    this.phase = 'ready';
    this.log.debug('client ready');
    // Anything the client pipelined after its password is already framed into authInbox.
    const early = this.authInbox.splice(0);
    for (const m of early) this.inboxSink.message(m, 0, m.length);
    if (early.length > 0) this.drainInbox();
  }

  /**
   * From here on the client's bytes are relayed: a plaintext TCP client moves onto the native socket
   * layer (io/), which keeps the same events. Startup and authentication stayed on Node's socket, where
   * TLS may have taken over; adoptSocket leaves those, and sockets with bytes still queued, alone.
   */
  private adoptNativeSocket(): void {
    const fast = adoptSocket(this.socket);
    if (fast === null) return;
    this.socket = fast;
    this.listenTo(fast);
  }

  private listenTo(socket: ClientTransport): void {
    socket.on('data', this.onDataListener);
    socket.on('error', (err) => this.log.debug({ err: err.message }, 'client socket error'));
    socket.on('close', () => this.cleanup());
  }

  private loginFailed(err: unknown): void {
    if (err instanceof LoginRefused) {
      this.log.info({ code: err.fields.code, reason: err.fields.message }, 'login refused');
      this.fatal(err.fields);
    } else if (err instanceof BackendError) {
      this.log.info({ code: err.code, reason: err.message }, 'backend refused login');
      this.fatal({ code: err.code, message: err.message, ...(err.fields.get('D') ? { detail: err.fields.get('D')! } : {}) });
    } else if (err instanceof AcquireTimeout) {
      this.fatal({ code: '53300', message: err.message });
    } else if (err instanceof BackendUnavailable || err instanceof ScramError) {
      this.log.warn({ err: err.message }, 'login failed');
      this.fatal({ code: '08006', message: err.message });
    } else if (err instanceof ProtocolViolation) {
      this.protocolError(err);
    } else {
      this.log.error({ err: String(err) }, 'login failed unexpectedly');
      this.fatal({ code: 'XX000', message: 'internal error during login' });
    }
  }

  private nextAuthMessage(): Promise<Buffer> {
    const m = this.authInbox.shift();
    if (m !== undefined) return Promise.resolve(m);
    return new Promise((resolve) => (this.authWaiter = resolve));
  }

  private async expectPassword(): Promise<Buffer> {
    const m = await this.nextAuthMessage();
    if (m[0] !== Msg.PasswordMessage) throw new ProtocolViolation(`expected password response, got message type 0x${m[0]!.toString(16)}`);
    return m.subarray(5);
  }

  private authFailed(): LoginRefused {
    return new LoginRefused({ code: '28P01', message: `password authentication failed for user "${this.identity!.clientUser}"` });
  }

  /**
   * method = "jwt_claim": the password is a JWT. Its signature and claims are checked before anything
   * reaches a backend; the tenant comes from the claim, the backend role from the user name, and the
   * backend login uses the role's secret from [auth].
   */
  private async tokenLogin(user: string, database: string | undefined): Promise<Identity> {
    const jwt = this.ctx.jwt!;
    if (!this.encrypted && !isLoopback(this.socket.remoteAddress)) {
      throw new LoginRefused({ code: '28000', message: 'a token is accepted only over TLS or from loopback', hint: 'Connect with sslmode=require.' });
    }
    this.socket.write(authentication(AuthCode.CleartextPassword));
    const body = await this.expectPassword();
    const token = readCString(body, 0, body.length)[0];
    let tenantId: string;
    try {
      tenantId = (await jwt.verify(token)).tenantId;
    } catch (err) {
      if (err instanceof TokenRefused) throw new LoginRefused({ code: err.code, message: `token authentication failed for user "${user}": ${err.message}` });
      throw err;
    }
    const identity = this.ctx.tenants.identifyTenant(tenantId, user, user, database === user ? undefined : database);
    await this.checkTokenRole(identity.role);
    return identity;
  }

  /** A token proves the tenant, not a PostgreSQL password: only roles meant for token holders may be used. */
  private async checkTokenRole(role: string): Promise<void> {
    const creds = this.ctx.credentials;
    const allowed = this.ctx.config.multi_tenancy.identification.jwt?.allowed_roles;
    // Config load makes allowed_roles required for jwt_claim; absent, nothing is permitted.
    if (allowed === undefined || !allowed.includes(role)) throw new LoginRefused({ code: '28000', message: `role "${role}" may not log in with a token` });
    if (!(await creds.canLogInWithoutClient(role))) {
      throw new LoginRefused({
        code: '28000',
        message: `the proxy holds no usable backend password for role "${role}"`,
        hint: 'Token logins need the role\'s password in auth_file as plain text or md5 (a SCRAM verifier cannot log in to PostgreSQL).',
      });
    }
  }

  /**
   * Proves the client knows the role's password. Returns a backend connection when proving it took one
   * (passthrough mode: the backend judged the cleartext password), else null.
   */
  private async authenticate(identity: Identity): Promise<ServerConnection | null> {
    const creds = this.ctx.credentials;
    const role = identity.role;
    if (creds.passthrough) {
      if (!this.encrypted && !isLoopback(this.socket.remoteAddress)) {
        throw new LoginRefused({
          code: '28000',
          message: 'cleartext password passthrough is only allowed over TLS or from loopback clients',
          hint: 'Connect with sslmode=require, or configure [auth] (auth_file or auth_query).',
        });
      }
      this.socket.write(authentication(AuthCode.CleartextPassword));
      const body = await this.expectPassword();
      const password = readCString(body, 0, body.length)[0];
      if ((await creds.verifyLearned(role, password)) === 'match') return null;
      try {
        const server = await this.pool!.acquire(identity.tenant, { kind: 'plain', password });
        if (!server.passwordChecked) {
          // The login proved nothing: keep the connection (it is a good one), refuse the client.
          this.pool!.release(server, true, identity.tenant);
          this.log.warn({ role }, 'password passthrough refused: PostgreSQL did not ask the proxy for a password (pg_hba.conf trust or peer)');
          throw new LoginRefused({
            code: '28000',
            message: `password authentication is not possible for user "${role}": PostgreSQL did not ask the proxy for the password`,
            hint: 'Password passthrough needs password (scram-sha-256 or md5) rules in pg_hba.conf for the proxy\'s connections, or configure [auth] (auth_file or auth_query).',
          });
        }
        creds.learn(role, server.derivedKeys !== null ? { kind: 'scram', keys: server.derivedKeys } : { kind: 'plain', password });
        return server;
      } catch (err) {
        if (err instanceof BackendError && err.code === '28P01') throw this.authFailed();
        throw err;
      }
    }

    const secret = await creds.lookup(role);
    if (secret === null) {
      // Run the same exchange a known role would get, so role names cannot be probed.
      if (creds.authType === 'md5') await this.md5Exchange(null);
      else await this.scramExchange(mockScramKeys(role));
      throw this.authFailed();
    }
    if (secret.kind === 'md5' || (secret.kind === 'plain' && creds.authType === 'md5')) {
      // The client hashes with the user name it sent (acme.appuser), so a plain password is hashed the same
      // way; a stored md5 hash is bound to its role name and only matches clients that log in as that role.
      const stored = secret.kind === 'md5' ? secret.hash : md5Secret(secret.password, identity.clientUser);
      if (!(await this.md5Exchange(stored))) throw this.authFailed();
      return null;
    }
    const keys: ScramKeys = secret.kind === 'scram' ? secret.keys : await plainVerifier(role, secret.password);
    const clientKey = await this.scramExchange(keys);
    if (clientKey === null) throw this.authFailed();
    if (secret.kind === 'scram') creds.learn(role, { kind: 'scram', keys: { ...secret.keys, clientKey } });
    return null;
  }

  /** Runs md5 authentication with the client; false for a wrong password (always, with no stored hash). */
  private async md5Exchange(stored: string | null): Promise<boolean> {
    const salt = randomBytes(4);
    this.socket.write(authentication(AuthCode.MD5Password, salt));
    const body = await this.expectPassword();
    return stored !== null && md5Matches(stored, salt, readCString(body, 0, body.length)[0]);
  }

  /** Runs SCRAM-SHA-256 with the client; resolves to its ClientKey, or null for a wrong password. */
  private async scramExchange(keys: ScramKeys): Promise<Buffer | null> {
    this.socket.write(authenticationSASL(['SCRAM-SHA-256']));
    const first = await this.expectPassword();
    const [mechanism, afterMech] = readCString(first, 0, first.length);
    if (mechanism !== 'SCRAM-SHA-256' || afterMech < 0 || afterMech + 4 > first.length) {
      throw new LoginRefused({ code: '28000', message: `unsupported SASL mechanism "${mechanism}"` });
    }
    const len = first.readInt32BE(afterMech);
    const exchange = new ScramServerExchange(keys);
    const serverFirst = exchange.clientFirst(first.subarray(afterMech + 4, afterMech + 4 + Math.max(0, len)));
    this.socket.write(authentication(AuthCode.SASLContinue, serverFirst));
    const final = exchange.clientFinal(await this.expectPassword());
    if (final === null) return null;
    this.socket.write(authentication(AuthCode.SASLFinal, final.serverFinal));
    return final.clientKey;
  }

  // ── backend checkout ───────────────────────────────────────────────────────────────

  private acquireServer(): Promise<ServerConnection> {
    return this.pool!.acquire(this.identity!.tenant);
  }

  /**
   * Makes a backend carry this client's tenant and settings: a reset when it last served someone else's
   * state, then the tenant's search_path and the client's GUCs, in one round trip.
   */
  /** Whether a backend already carries exactly this client's tenant and settings (the common case). */
  private inLine(server: ServerConnection): boolean {
    const tenant = this.identity!.tenant;
    if (this.reapply || server.owner !== tenant.ownerKey || server.staleStatements) return false;
    if (tenant.searchPath !== null && server.applied.get('search_path') !== tenant.searchPath) return false;
    let matched = tenant.searchPath === null ? 0 : 1;
    for (const [k, v] of this.desired) {
      if (server.applied.get(k) !== v) return false;
      matched++;
    }
    return matched === server.applied.size;
  }

  private async bringInLine(server: ServerConnection): Promise<void> {
    if (this.inLine(server)) return;
    const tenant = this.identity!.tenant;
    const owner = tenant.ownerKey;
    const sqls: string[] = [];
    if (server.owner !== owner && server.owner !== null) {
      // Isolation is not optional: a connection changing tenant is always reset, even with reset_query = "".
      sqls.push(this.ctx.config.pool_mode.reset_query.trim() || 'DISCARD ALL');
      server.applied.clear();
      server.prepared.clear();
      server.staleStatements = false;
    } else if (server.staleStatements) {
      sqls.push('DEALLOCATE ALL');
      server.prepared.clear();
      server.staleStatements = false;
    }
    const sets: string[] = [];
    if (tenant.searchPath !== null && server.applied.get('search_path') !== tenant.searchPath) {
      sets.push(`SET search_path TO ${tenant.searchPath}`);
    }
    for (const [k, v] of this.desired) if (server.applied.get(k) !== v) sets.push(`SET ${k} TO ${quoteLiteral(v)}`);
    for (const k of server.applied.keys()) if (k !== 'search_path' && !this.desired.has(k)) sets.push(`RESET ${k}`);
    if (sets.length > 0) sqls.push(sets.join('; '));
    if (sqls.length > 0) {
      server.owner = null; // until it is known to be in line
      await server.run(sqls);
      for (const k of [...server.applied.keys()]) if (k !== 'search_path' && !this.desired.has(k)) server.applied.delete(k);
      for (const [k, v] of this.desired) server.applied.set(k, v);
      if (tenant.searchPath !== null) server.applied.set('search_path', tenant.searchPath);
    }
    server.owner = owner;
    this.reapply = false;
  }

  private attach(server: ServerConnection): void {
    this.server = server;
    server.attach(this);
  }

  /** Returns the backend to its pool. Only with nothing in flight. */
  private releaseServer(reusable: boolean): void {
    const server = this.server;
    if (server === null) return;
    this.flushToClient();
    server.detach();
    this.server = null;
    // Paused for this client's backpressure: the next client must find it reading.
    if (server.socket.isPaused()) server.socket.resume();
    const pool = this.pool!;
    const tenant = this.identity!.tenant;
    if (server.cancelsInFlight === 0) pool.release(server, reusable, tenant);
    else server.whenNoCancelPending(() => pool.release(server, reusable, tenant));
  }

  // ── client messages in the ready phase ─────────────────────────────────────────────

  private drainInbox(): void {
    if (this.blocked || this.phase !== 'ready') return;
    let sock = this.server?.socket;
    sock?.cork();
    try {
      while (this.inHead < this.inTail) {
        const buf = this.inBufs[this.inHead]!;
        const start = this.inStarts[this.inHead]!;
        const end = this.inEnds[this.inHead]!;
        const type = buf[start]!;
        if (type === Msg.Terminate) {
          this.flushToServer();
          this.clientTerminated = true;
          this.terminate();
          return;
        }
        if (this.skippingUntilSync) {
          // After a refusal the proxy answered itself, PostgreSQL's rule: ignore everything up to Sync.
          if (type === Msg.Sync) {
            this.skippingUntilSync = false;
            this.toClientOwn(readyForQuery(this.txStatus));
          }
          this.inHead++;
          continue;
        }
        if (this.judgedIndex !== this.inHead) {
          this.judgedIndex = this.inHead;
          this.refusal = this.identity!.tenant.checksStatements ? this.judge(type, buf, start, end) : null;
          if (this.refusal !== null && this.refuseLocally(this.refusal, type)) {
            this.inHead++;
            continue;
          }
        }
        if (this.tenant.paused && this.expect.length === 0 && this.txStatus === 'I') {
          // Paused by an operator: nothing new starts (in any pool mode) until resume.
          this.block(this.tenant.whenResumed());
          return;
        }
        if (this.server === null) {
          if (this.answerWithoutServer(type, buf, start, end)) {
            this.inHead++;
            continue;
          }
          if (this.txStatus === 'I' && this.endingReason() !== null) {
            this.fatal({ code: '57P01', message: this.endingReason()! });
            return;
          }

          // Fast path: an idle backend already in line is attached without leaving this loop.
          const ready = this.pool!.tryTake(this.identity!.tenant);
          if (ready !== null && this.inLine(ready)) {
            this.attach(ready);
            sock = ready.socket;
            sock.cork();
          } else {
            this.block(this.checkoutForRequest(ready));
            return;
          }
        } else if (this.expect.length === 0 && this.server.cancelsInFlight > 0) {
          // A cancel the proxy sent is still on its way: it must not land on this client's next statement.
          const server = this.server;
          this.flushToServer();
          this.block(new Promise<void>((resolve) => server.whenNoCancelPending(resolve)));
          return;
        } else if (this.expect.length === 0 && this.server.txStatus !== 'E' && !this.inLine(this.server)) {
          // Session mode (or between statements of a transaction): a statement dropped the proxy's settings.
          this.flushToServer();
          this.block(this.resync(this.server));
          return;
        }
        this.inHead++;
        if (this.expect.length === 0) {
          this.requestStartedAt = turnNow();
          this.requestFailed = false;
        }
        if (this.refusal !== null) this.refuseThroughServer(this.refusal, type);
        else this.forwardClientMessage(buf, start, end, type);
      }
      this.flushToServer();
      // Drop the chunks (a stale one would pin its slab of Node's buffer pool while the client idles).
      for (let i = 0; i < this.inTail; i++) this.inBufs[i] = null;
      this.inHead = 0;
      this.inTail = 0;
      this.judgedIndex = -1;
    } finally {
      sock?.uncork();
    }
  }

  /** Stops reading the client until `work` is done, then picks up where the inbox left off. */
  private block(work: Promise<void>): void {
    this.blocked = true;
    this.socket.pause();
    work.then(
      () => {
        this.blocked = false;
        if (this.phase !== 'ready') return;
        this.socket.resume();
        this.drainInbox();
      },
      (err: unknown) => {
        this.blocked = false;
        if (err instanceof AcquireTimeout) {
          this.log.warn({ reason: 'acquire_timeout' }, err.message);
          this.fatal({ code: '53300', message: err.message });
        } else if (err instanceof BackendError) {
          this.fatal({ code: err.code, message: err.message });
        } else {
          this.log.warn({ err: String(err) }, 'no backend for request');
          this.fatal({ code: '08006', message: `could not get a backend connection: ${err instanceof Error ? err.message : String(err)}` });
        }
      },
    );
  }

  /** Re-applies the tenant's settings on the attached backend; it must be detached while the proxy talks to it. */
  private async resync(server: ServerConnection): Promise<void> {
    server.detach();
    try {
      await this.bringInLine(server);
    } finally {
      if (this.server === server && !server.closed) server.attach(this);
    }
    this.reportParameterChanges(server);
  }

  /** Sends the client ParameterStatus for reported settings the backend now holds differently. */
  private reportParameterChanges(server: ServerConnection): void {
    let out: Buffer[] | null = null;
    for (const [name, value] of server.params) {
      if (this.clientParams.get(name) === value) continue;
      this.clientParams.set(name, value);
      (out ??= []).push(parameterStatus(name, value));
    }
    if (out !== null) this.writeClient(Buffer.concat(out));
  }

  private async checkoutForRequest(taken: ServerConnection | null): Promise<void> {
    const server = taken ?? (await this.acquireServer());
    try {
      await this.bringInLine(server);
    } catch (err) {
      this.pool!.release(server, false, this.identity!.tenant);
      throw err;
    }
    if (this.phase !== 'ready') {
      this.pool!.release(server, true, this.identity!.tenant);
      return;
    }
    this.attach(server);
    this.reportParameterChanges(server);
  }

  // ── guardrails ─────────────────────────────────────────────────────────────────────

  /**
   * Judges a Query, Parse, Execute or FunctionCall against the tenant's isolation, permissions and QPS
   * bucket. One "query" for the bucket is one statement of a simple Query, or one Execute.
   */
  private judge(type: number, buf: Buffer, start: number, end: number): Rejection | null {
    const tenant = this.identity!.tenant;
    this.judgedFacts = null;
    switch (type) {
      case Msg.Query: {
        const verdict = this.judgeSql(buf, start + 5, end - 1);
        if (verdict !== null) return verdict;
        const statements = this.judgedFacts === null ? 1 : Math.max(1, (this.judgedFacts as StatementFacts[]).length);
        return this.takeTokens(statements);
      }
      case Msg.Parse: {
        const span = parseNameSpan(buf, start, end);
        if (span === null) return null; // malformed: PostgreSQL will say so
        const queryEnd = buf.indexOf(0, span[1] + 1);
        return this.judgeSql(buf, span[1] + 1, queryEnd < 0 || queryEnd >= end ? end : queryEnd);
      }
      case Msg.Execute:
        return this.takeTokens(1);
      case Msg.FunctionCall:
        // A fast-path call names its function by OID: nothing to check it against.
        return tenant.rules.permissions !== null || tenant.rules.allowedSchemas !== null
          ? { code: '42501', reason: 'permission', message: `permission denied for tenant "${tenant.id}": fast-path function calls cannot be checked` }
          : this.takeTokens(1);
      default:
        return null;
    }
  }

  /** Judges the SQL text in buf[start, end) (UTF-8). */
  private judgeSql(buf: Buffer, start: number, end: number): Rejection | null {
    const tenant = this.identity!.tenant;
    // The limit counts characters; only a text with more bytes than that can have too many.
    const sql = end - start > MAX_CHECKED_SQL ? buf.toString('utf8', start, end) : null;
    if (sql !== null && sql.length > MAX_CHECKED_SQL) {
      return { code: '54000', reason: 'too_long', message: `statement too long for tenant "${tenant.id}": the proxy checks statements up to ${MAX_CHECKED_SQL} characters` };
    }
    const facts = this.ctx.statements.lookupText(buf, start, end, sql);
    if (facts instanceof ParseFailure) return null; // nothing unparsable can run: PostgreSQL reports the syntax error
    for (const f of facts) {
      const r = checkStatement(f, tenant.rules);
      if (r !== null) return r;
    }
    this.judgedFacts = facts;
    return null;
  }

  private takeTokens(n: number): Rejection | null {
    const tenant = this.identity!.tenant;
    const bucket = tenant.bucket;
    if (bucket === null) return null;
    const waitMs = bucket.take(n);
    if (waitMs === 0) return null;
    return {
      code: '53400',
      reason: 'rate_limit',
      message: `rate limit exceeded for tenant "${tenant.id}": qps_limit is ${bucket.rate} (burst ${bucket.capacity})`,
      detail: `Retry after ${waitMs} ms.`,
    };
  }

  private refusalMessage(r: Rejection): Buffer {
    const tenant = this.identity!.tenant;
    tenant.stats.rejections[r.reason]++;
    this.log.info({ reason: r.reason, code: r.code }, r.message);
    return errorResponse({ severity: 'ERROR', code: r.code, message: r.message, ...(r.detail ? { detail: r.detail } : {}), ...(r.hint ? { hint: r.hint } : {}) });
  }

  /**
   * With nothing in flight and no transaction open, a refusal needs no backend: the proxy answers as
   * PostgreSQL would (ErrorResponse, then ReadyForQuery or skip-until-Sync). Returns false otherwise.
   */
  private refuseLocally(r: Rejection, type: number): boolean {
    if (this.expect.length > 0 || this.txStatus === 'T') return false;
    const err = this.refusalMessage(r);
    this.flushToServer();
    if (type === Msg.Query || type === Msg.FunctionCall) this.toClientOwn(Buffer.concat([err, readyForQuery(this.txStatus)]));
    else {
      this.toClientOwn(err);
      this.skippingUntilSync = true;
    }
    return true;
  }

  /**
   * Inside a transaction (or behind requests in flight) the backend must fail too, or a later COMMIT would
   * commit what came before the refusal. The refused message is replaced by one the backend rejects at
   * once without running anything, and its error is replaced by the proxy's.
   */
  private refuseThroughServer(r: Rejection, type: number): void {
    const err = this.refusalMessage(r);
    switch (type) {
      case Msg.Parse:
        this.awaitingSync = true;
        this.toServerOwn(parse('hp_refused', REFUSED_SQL));
        this.expect.push(Expect.Parse, null, err);
        break;
      case Msg.Execute:
        this.awaitingSync = true;
        this.toServerOwn(execute('hp_refused'));
        this.expect.push(Expect.Execute, null, err);
        break;
      default:
        this.toServerOwn(query(REFUSED_SQL));
        this.expect.push(Expect.Sync, null, err);
    }
  }

  /** Cancels the statement running for this client because the proxy's limit was hit (not the client's cancel). */
  private cancelFor(reason: 'duration' | 'result'): void {
    if (this.cancelReason !== null || this.server === null) return;
    this.cancelReason = reason;
    this.ctx.sendCancel(this.server);
  }

  /**
   * Called by the proxy's duration watch (every 100 ms) for sessions that started a statement; false when
   * none is running any more, and the watch then stops looking at this session.
   */
  checkDuration(now: number): boolean {
    if (this.runningSince === 0) return false;
    const limit = this.identity?.tenant.maxDurationMs ?? null;
    if (limit !== null && this.cancelReason === null && now - this.runningSince > limit) this.cancelFor('duration');
    return true;
  }

  /** A statement (or a whole simple Query) finished: the next one in flight, if any, starts its clock now. */
  private statementDone(): void {
    this.rowCount = 0;
    this.byteCount = 0;
    // The duration watch drops the session from ctx.running itself: no Set churn per statement.
    if (this.expect.length > 0 && this.runningSince !== 0) this.runningSince = turnNow();
    else this.runningSince = 0;
  }

  private statementStarted(): void {
    const tenant = this.identity!.tenant;
    tenant.stats.queries++;
    if (this.runningSince === 0 && tenant.maxDurationMs !== null) {
      // The request's own start time when this is its first statement: one clock read, not two.
      this.runningSince = this.expect.length <= 1 ? this.requestStartedAt : turnNow();
      this.ctx.running.add(this);
    }
  }

  /** The ErrorResponse the client gets for a statement the proxy cancelled or cut short. */
  private limitError(reason: 'duration' | 'result'): Buffer {
    const tenant = this.identity!.tenant;
    if (reason === 'duration') {
      tenant.stats.rejections.duration++;
      this.log.info({ reason: 'duration' }, 'statement cancelled: max_query_duration');
      return errorResponse({ severity: 'ERROR', code: '57014', message: `canceling statement due to max_query_duration of tenant "${tenant.id}" (${tenant.maxDurationMs! / 1000} s)` });
    }
    const rowsHit = tenant.maxRows !== null && this.rowCount > tenant.maxRows;
    tenant.stats.rejections[rowsHit ? 'rows' : 'result_size']++;
    this.log.info({ reason: rowsHit ? 'rows' : 'result_size' }, 'result limit exceeded');
    return errorResponse({
      severity: 'ERROR',
      code: '54000',
      message: rowsHit
        ? `result exceeds max_rows_per_query of tenant "${tenant.id}" (${tenant.maxRows} rows)`
        : `result exceeds max_result_size of tenant "${tenant.id}" (${tenant.maxResultBytes} bytes)`,
    });
  }

  /** Between transactions some messages need no backend at all. Returns false when one is needed. */
  private answerWithoutServer(type: number, buf: Buffer, start: number, end: number): boolean {
    switch (type) {
      case Msg.Sync:
        this.socket.write(readyForQuery(this.txStatus));
        return true;
      case Msg.Flush:
      case Msg.CopyData:
      case Msg.CopyDone:
      case Msg.CopyFail:
        return true; // PostgreSQL ignores these outside COPY
      case Msg.Close:
        this.awaitingSync = true;
        if (this.tracking && isStatementTarget(buf, start)) {
          const span = targetSpan(buf, start, end);
          if (span !== null && span[1] > span[0]) {
            this.statements.delete(buf.toString('utf8', span[0], span[1]));
            this.socket.write(CLOSE_COMPLETE);
            return true;
          }
        }
        return false;
      default:
        return false;
    }
  }

  private get tracking(): boolean {
    const pm = this.ctx.config.pool_mode;
    return pm.prepared_statement_mode === 'track' && pm.mode !== 'session';
  }

  private forwardClientMessage(buf: Buffer, start: number, end: number, type: number): void {
    switch (type) {
      case Msg.Query:
        if (this.tracking && this.forwardDeallocate(buf, start + 5, end - 1, null)) return;
        this.noteStateChanges(buf, start + 5, end);
        if (this.mustWrap()) {
          // All or nothing, as PostgreSQL runs it, even when a result limit cuts a statement short after
          // the backend already ran the others: an explicit transaction the proxy ends itself.
          this.toServerOwn(query('BEGIN'));
          this.expect.push(Expect.InternalSilent);
          this.wrappedQuery = true;
        }
        this.expect.push(Expect.Sync);
        this.statementStarted();
        break;
      case Msg.Sync:
        // During COPY FROM STDIN the backend ignores Sync: no ReadyForQuery will answer it, and a COPY run
        // by Execute still needs a Sync after its CopyDone/CopyFail.
        if (!this.copyIn) {
          this.expect.push(Expect.Sync);
          this.awaitingSync = false;
        }
        break;
      case Msg.FunctionCall:
        this.expect.push(Expect.Sync);
        break;
      case Msg.Execute:
        this.awaitingSync = true;
        this.expect.push(Expect.Execute);
        this.statementStarted();
        break;
      case Msg.CopyDone:
      case Msg.CopyFail:
        this.copyIn = false;
        break;
      case Msg.Parse:
        this.awaitingSync = true;
        if (this.tracking && this.forwardDeallocateParse(buf, start, end)) return;
        if (this.tracking && this.trackParse(buf, start, end)) return;
        this.noteStateChanges(buf, start + 5, end);
        this.expect.push(Expect.Parse);
        break;
      case Msg.Bind: {
        this.awaitingSync = true;
        this.expect.push(Expect.Bind);
        if (this.tracking && this.forwardRenamed(buf, start, end, bindStatementSpan(buf, start, end))) return;
        break;
      }
      case Msg.Describe:
        this.awaitingSync = true;
        this.expect.push(Expect.Describe);
        if (this.tracking && isStatementTarget(buf, start) && this.forwardRenamed(buf, start, end, targetSpan(buf, start, end))) return;
        break;
      case Msg.Close:
        this.awaitingSync = true;
        if (this.tracking && isStatementTarget(buf, start)) {
          const span = targetSpan(buf, start, end);
          const name = span === null ? '' : buf.toString('utf8', span[0], span[1]);
          if (name !== '' && this.statements.delete(name)) {
            // The backend keeps it for whoever needs it next; the client sees it closed.
            this.expect.push(Expect.SynthCloseComplete);
            this.emitSynthesized();
            return;
          }
        }
        this.expect.push(Expect.Close);
        break;
      default:
        break; // Flush, CopyData, CopyDone, CopyFail and anything else go through untouched
    }
    this.toServer(buf, start, end);
  }

  /**
   * SQL-level `DEALLOCATE name` of a statement the client prepared through the protocol: in track mode the
   * backend knows it under the proxy's name, so the statement is made sure to exist here and the text is
   * rewritten to that name (the client gets PostgreSQL's own answer). Returns false when not applicable.
   */
  private forwardDeallocate(buf: Buffer, from: number, to: number, parseName: string | null): boolean {
    // Nothing tracked (most clients of a simple-protocol Query): no text to decode and match.
    if (this.statements.size === 0 || to - from > 200) return false;
    const m = DEALLOCATE_ONE.exec(buf.toString('utf8', from, to));
    if (m === null) return false;
    const name = m[1] !== undefined ? m[1].replace(/""/g, '"') : m[2]!.toLowerCase();
    const tracked = this.statements.get(name);
    if (tracked === undefined) return false;
    const server = this.server!;
    if (!server.prepared.has(tracked.serverName)) this.prepareOnServer(server, tracked, Expect.DropParse);
    this.statements.delete(name);
    server.prepared.delete(tracked.serverName);
    const sql = `DEALLOCATE ${tracked.serverName}`;
    if (parseName === null) {
      this.toServerOwn(query(sql));
      this.expect.push(Expect.Sync);
      this.statementStarted();
    } else {
      this.toServerOwn(parse(parseName, sql));
      this.expect.push(Expect.Parse);
    }
    return true;
  }

  /** The same for an extended-protocol Parse whose text is `DEALLOCATE name` (psycopg sends it so). */
  private forwardDeallocateParse(buf: Buffer, start: number, end: number): boolean {
    if (this.statements.size === 0) return false;
    const span = parseNameSpan(buf, start, end);
    if (span === null) return false;
    if (span[1] > span[0]) return false; // a named Parse of DEALLOCATE: leave it to the server
    const queryEnd = buf.indexOf(0, span[1] + 1);
    if (queryEnd < 0 || queryEnd >= end) return false;
    return this.forwardDeallocate(buf, span[1] + 1, queryEnd, '');
  }

  /** A named Parse: answer it locally when this backend already has the statement, else send it renamed. */
  private trackParse(buf: Buffer, start: number, end: number): boolean {
    const span = parseNameSpan(buf, start, end);
    if (span === null || span[1] === span[0]) return false; // unnamed: per-connection by nature
    const name = buf.toString('utf8', span[0], span[1]);
    // The DDL epoch is part of the name: a Parse after the tenant changed its schema gets a fresh backend
    // statement (as a fresh PostgreSQL prepare would), while statements prepared before keep PostgreSQL's
    // own behaviour (0A000 "cached plan must not change result type", which drivers recover from).
    const serverName = serverStatementName(`${this.tenant.ownerKey}\0${this.tenant.ddlEpoch}`, buf, span[1] + 1, end);
    const max = this.ctx.config.pool_mode.max_prepared_statements;
    if (!this.statements.has(name) && this.statements.size >= max) {
      this.fatal({ code: '53400', message: `too many prepared statements: max_prepared_statements is ${max}` });
      return true;
    }
    this.noteStateChanges(buf, span[1] + 1, end);
    const tracked: TrackedStatement = { serverName, parse: renameIn(buf, start, end, span[0], span[1], serverName) };
    this.statements.set(name, tracked);
    const server = this.server!;
    if (server.prepared.has(serverName)) {
      server.prepared.delete(serverName);
      server.prepared.set(serverName, true);
      this.expect.push(Expect.SynthParseComplete);
      this.emitSynthesized();
    } else {
      this.prepareOnServer(server, tracked, Expect.Parse);
    }
    return true;
  }

  /** Sends a tracked Parse, evicting the backend's least recently used statement when its cache is full. */
  private prepareOnServer(server: ServerConnection, s: TrackedStatement, kind: Expect.Parse | Expect.DropParse): void {
    if (server.prepared.size >= SERVER_STATEMENT_CACHE) {
      const oldest = server.prepared.keys().next().value as string;
      server.prepared.delete(oldest);
      this.toServerOwn(closeStatement(oldest));
      this.expect.push(Expect.DropClose);
    }
    server.prepared.set(s.serverName, true);
    this.toServerOwn(s.parse);
    this.expect.push(kind, s.serverName);
  }

  /** Bind/Describe of a tracked statement: make sure this backend has it, then forward with its backend name. */
  private forwardRenamed(buf: Buffer, start: number, end: number, span: [number, number] | null): boolean {
    if (span === null || span[1] === span[0]) return false;
    const tracked = this.statements.get(buf.toString('utf8', span[0], span[1]));
    if (tracked === undefined) return false; // unknown: the backend answers "does not exist"
    const server = this.server!;
    // The Bind/Describe entry is already queued; an injected Parse must answer before it.
    const entry = this.expect.popLast();
    if (!server.prepared.has(tracked.serverName)) this.prepareOnServer(server, tracked, Expect.DropParse);
    else {
      server.prepared.delete(tracked.serverName);
      server.prepared.set(tracked.serverName, true);
    }
    this.expect.push(entry);
    this.toServerOwn(renameIn(buf, start, end, span[0], span[1], tracked.serverName));
    return true;
  }

  /** Statements that may drop the proxy's settings or the backend's prepared statements, noted for ReadyForQuery. */
  private noteStateChanges(buf: Buffer, from: number, end: number): void {
    const facts = this.judgedFacts;
    if (facts !== null) {
      this.noteFacts(facts);
      return;
    }
    // Not classified (a tenant without guardrails): a keyword test on the raw text. latin1 decoding is a
    // straight byte copy: enough for keywords, and no UTF-8 validation cost.
    const text = buf.toString('latin1', from, end);
    if (RESETS_STATE.test(text)) this.reapplyAtReady = true;
    if (DROPS_STATEMENTS.test(text)) this.dropStatementsAtReady = true;
    if (CHANGES_SCHEMA.test(text)) this.ddlAtReady = true;
    const pin = PINS.exec(text);
    if (pin !== null) this.pinAtReady ??= pin[1]!.toUpperCase();
    if (RESETS_ALL.test(text)) this.restoreAtReady = 'all';
    else if (this.restoreAtReady !== 'all') {
      for (const m of text.matchAll(RESETS_ONE)) {
        const name = m[1]!.toLowerCase();
        if (!this.startupParams.has(name)) continue;
        const set: Set<string> = this.restoreAtReady instanceof Set ? this.restoreAtReady : new Set();
        set.add(name);
        this.restoreAtReady = set;
      }
    }
  }

  /** A multi-statement Query of a tenant with result limits, outside any transaction, with no transaction control inside. */
  private mustWrap(): boolean {
    const facts = this.judgedFacts;
    return (
      this.tenant.countsResults &&
      facts !== null &&
      facts.length > 1 &&
      this.txStatus === 'I' &&
      this.expect.length === 0 &&
      !facts.some((f) => f.kind === 'TransactionStmt')
    );
  }

  /** The same notes as the keyword test, from the classifier's facts. */
  private noteFacts(facts: StatementFacts[]): void {
    for (const f of facts) {
      if (f.pins !== null) this.pinAtReady ??= f.pins;
      for (const st of f.settings) {
        if (st.local || !FOLLOWING_SETTING.test(st.name) || NOT_FOLLOWED.has(st.name)) continue;
        if (st.via === 'reset') this.pendingSets.push({ name: st.name, value: null });
        else if (st.values !== null) this.pendingSets.push({ name: st.name, value: st.values.join(', ') });
      }
      if (f.dropsPrepared) this.dropStatementsAtReady = true;
      if (f.ddl) this.ddlAtReady = true;
      for (const st of f.settings) {
        if (st.name === 'search_path' || st.name === 'all' || st.name === 'role' || st.name === 'session_authorization') this.reapplyAtReady = true;
        if (st.via !== 'reset') continue;
        if (st.name === 'all') this.restoreAtReady = 'all';
        else if (this.restoreAtReady !== 'all' && this.startupParams.has(st.name)) {
          const set: Set<string> = this.restoreAtReady instanceof Set ? this.restoreAtReady : new Set();
          set.add(st.name);
          this.restoreAtReady = set;
        }
      }
    }
  }

  // ── writing ────────────────────────────────────────────────────────────────────────

  private toServer(buf: Buffer, start: number, end: number): void {
    if (this.toServerBuf === buf && this.toServerEnd === start) {
      this.toServerEnd = end;
      return;
    }
    this.flushToServer();
    this.toServerBuf = buf;
    this.toServerStart = start;
    this.toServerEnd = end;
  }

  private toServerOwn(msg: Buffer): void {
    this.flushToServer();
    this.writeServer(msg);
  }

  private flushToServer(): void {
    const b = this.toServerBuf;
    if (b === null) return;
    this.toServerBuf = null;
    // The common case is a whole chunk passed through: no view to allocate.
    this.writeServer(this.toServerStart === 0 && this.toServerEnd === b.length ? b : b.subarray(this.toServerStart, this.toServerEnd));
  }

  private writeServer(data: Buffer): void {
    const server = this.server;
    if (server === null) return;
    if (!server.write(data) && !this.socket.isPaused()) {
      // Backpressure: stop reading the client until the backend drains.
      this.socket.pause();
      server.socket.once('drain', () => {
        if (!this.blocked && this.phase === 'ready') this.socket.resume();
      });
    }
  }

  private toClient(buf: Buffer, start: number, end: number): void {
    if (this.toClientBuf === buf && this.toClientEnd === start) {
      this.toClientEnd = end;
      return;
    }
    this.flushToClient();
    this.toClientBuf = buf;
    this.toClientStart = start;
    this.toClientEnd = end;
  }

  private toClientOwn(msg: Buffer): void {
    this.flushToClient();
    this.writeClient(msg);
  }

  private flushToClient(): void {
    const b = this.toClientBuf;
    if (b === null) return;
    this.toClientBuf = null;
    this.writeClient(this.toClientStart === 0 && this.toClientEnd === b.length ? b : b.subarray(this.toClientStart, this.toClientEnd));
  }

  private writeClient(data: Buffer): void {
    if (this.socket.destroyed || this.socket.writableEnded) return;
    const server = this.server;
    if (!this.socket.write(data) && server !== null && !server.socket.isPaused()) {
      // Backpressure: a slow client holds its backend's results in the kernel, not in our memory.
      server.socket.pause();
      this.socket.once('drain', () => server.socket.resume());
    }
  }

  /** Writes the responses the proxy answers itself once everything before them was relayed. */
  private emitSynthesized(): void {
    for (;;) {
      const head = this.expect.peek();
      if (head === Expect.SynthParseComplete) this.toClientOwn(PARSE_COMPLETE);
      else if (head === Expect.SynthCloseComplete) this.toClientOwn(CLOSE_COMPLETE);
      else return;
      this.expect.shift();
    }
  }

  // ── bytes from the backend ─────────────────────────────────────────────────────────

  message(buf: Buffer, start: number, end: number): void {
    const type = buf[start]!;
    if (this.expect.peek() === Expect.InternalSilent) {
      if (type === Msg.ReadyForQuery) {
        this.server!.txStatus = String.fromCharCode(buf[start + 5]!) as TxStatus;
        this.expect.shift();
      }
      return;
    }
    if (this.droppingUntilReady && type !== Msg.ReadyForQuery) {
      if (type === Msg.ParameterStatus) this.server!.noteParameterStatus(buf, start, end);
      return;
    }
    switch (type) {
      case Msg.DataRow:
      case Msg.CopyData: {
        const t = this.tenant;
        t.stats.rows++;
        t.stats.bytes += end - start;
        if (t.countsResults && this.countResult(end - start)) return;
        this.toClient(buf, start, end);
        return;
      }
      case Msg.CopyDone:
        if (!this.resultTripped) this.toClient(buf, start, end);
        return;
      case Msg.ParseComplete:
      case Msg.CloseComplete: {
        const head = this.expect.peek();
        if (head !== Expect.DropParse && head !== Expect.DropClose) this.toClient(buf, start, end);
        this.expect.shift();
        this.emitSynthesized();
        return;
      }
      case Msg.BindComplete:
        this.toClient(buf, start, end);
        this.expect.shift();
        this.emitSynthesized();
        return;
      case Msg.RowDescription:
      case Msg.NoData:
        this.toClient(buf, start, end);
        if (this.expect.peek() === Expect.Describe) {
          this.expect.shift();
          this.emitSynthesized();
        }
        return;
      case Msg.CommandComplete:
      case Msg.EmptyQueryResponse:
      case Msg.PortalSuspended:
        if (this.resultTripped) {
          this.completedOverLimit();
          return;
        }
        this.toClient(buf, start, end);
        if (this.expect.peek() === Expect.Execute) {
          this.expect.shift();
          this.emitSynthesized();
        }
        this.statementDone();
        return;
      case Msg.ErrorResponse:
        this.onErrorResponse(buf, start, end);
        return;
      case Msg.CopyInResponse:
        // Syncs the client sent before its data will be ignored by the backend (protocol: copy-in mode).
        this.copyIn = true;
        // Started by Execute: the backend will want a Sync after the copy (the ones sent so far are ignored).
        if (this.expect.peek() === Expect.Execute) this.awaitingSync = true;
        this.expect.dropSyncsAfterHead();
        this.toClient(buf, start, end);
        return;
      case Msg.ReadyForQuery:
        this.onReadyForQuery(buf, start, end);
        return;
      case Msg.ParameterStatus:
        this.onParameterStatus(buf, start, end);
        return;
      default:
        this.toClient(buf, start, end);
    }
  }

  /** Counts a row against max_rows_per_query / max_result_size; true when it must be dropped. */
  private countResult(size: number): boolean {
    if (this.resultTripped) return true;
    const t = this.tenant;
    this.rowCount++;
    this.byteCount += size;
    if ((t.maxRows !== null && this.rowCount > t.maxRows) || (t.maxResultBytes !== null && this.byteCount > t.maxResultBytes)) {
      // Stop forwarding, stop the backend, and report at the statement's end: memory stays flat.
      this.resultTripped = true;
      this.flushToClient();
      // With other requests queued behind it, a cancel could land on one of them: drain instead.
      if (this.expect.onlyHeadInFlight()) this.cancelFor('result');
      return true;
    }
    return false;
  }

  /**
   * The statement finished before the cancel reached it: the client still gets the limit's error, and
   * since the backend did not fail, its further output up to ReadyForQuery is dropped (the client, as
   * after any error, expects nothing more before it).
   */
  private completedOverLimit(): void {
    this.toClientOwn(this.limitError('result'));
    this.resultTripped = false;
    this.cancelReason = null;
    this.tenant.stats.errors++;
    this.requestFailed = true;
    this.skipUntilSync();
    this.droppingUntilReady = true;
    this.statementDone();
  }

  private onErrorResponse(buf: Buffer, start: number, end: number): void {
    const head = this.expect.peek();
    if (head === Expect.Internal) return; // the proxy's own failing statement: its ReadyForQuery follows
    const substitute = this.expect.peekSubstitute();
    if (substitute !== null) this.toClientOwn(substitute);
    else if (this.resultTripped) this.toClientOwn(this.limitError('result'));
    else if (this.cancelReason === 'duration' && decodeErrorFields(buf, start, end).get('C') === '57014') this.toClientOwn(this.limitError('duration'));
    else {
      this.toClient(buf, start, end);
      // The backend is ending this connection (57P01 from pg_terminate_backend, a shutdown): the client
      // has been told why, and the close that follows needs no second FATAL of the proxy's own.
      const severity = decodeErrorFields(buf, start, end).get('V');
      if (severity === 'FATAL' || severity === 'PANIC') this.backendFatalRelayed = true;
    }
    if (substitute === null) this.tenant.stats.errors++;
    this.requestFailed = true;
    // "cached plan must not change result type": the proxy-named statement on this backend is stale.
    if (this.tracking && this.server !== null && this.server.prepared.size > 0 && decodeErrorFields(buf, start, end).get('C') === '0A000') {
      this.server.staleStatements = true;
    }
    this.resultTripped = false;
    this.cancelReason = null;
    this.copyIn = false;
    this.skipUntilSync();
    this.statementDone();
  }

  batchEnd(): void {
    this.flushToClient();
  }

  /** After an error PostgreSQL ignores everything up to Sync: so does the expect queue. */
  private skipUntilSync(): void {
    const server = this.server;
    for (;;) {
      const head = this.expect.peek();
      if (head === undefined || head === Expect.Sync) return;
      if ((head === Expect.Parse || head === Expect.DropParse) && server !== null) {
        const name = this.expect.peekPayload();
        if (name !== null) server.prepared.delete(name); // it never got prepared
      }
      this.expect.shift();
    }
  }

  private onParameterStatus(buf: Buffer, start: number, end: number): void {
    const server = this.server!;
    server.noteParameterStatus(buf, start, end);
    const [name, next] = readCString(buf, start + 5, end);
    const key = name.toLowerCase();
    if (next > 0 && TRACKED_PARAMETERS.has(key)) {
      // The client changed a reported setting itself: it follows the client to its next backend.
      const value = readCString(buf, next, end)[0];
      this.desired.set(key, value);
      server.applied.set(key, value);
    }
    this.toClient(buf, start, end);
  }

  private onReadyForQuery(buf: Buffer, start: number, end: number): void {
    const server = this.server!;
    const status = String.fromCharCode(buf[start + 5]!) as TxStatus;
    server.txStatus = status;
    while (this.expect.length > 0 && this.expect.peek() !== Expect.Sync && this.expect.peek() !== Expect.Internal) this.expect.shift();
    this.expect.shift();
    this.statementDone();
    if (this.wrappedQuery) {
      // End the proxy's transaction around the client's Query: commit what PostgreSQL would have.
      this.wrappedQuery = false;
      if (status !== 'I') {
        this.flushToClient();
        server.write(query(this.requestFailed || status === 'E' ? 'ROLLBACK' : 'COMMIT'));
        this.expect.push(Expect.Internal);
        this.droppingUntilReady = true;
        return;
      }
    }
    if (this.droppingUntilReady) {
      this.droppingUntilReady = false;
      if (status === 'T' && this.failServerTransaction(server)) return;
    }
    if (this.dropStatementsAtReady) {
      this.dropStatementsAtReady = false;
      if (!this.requestFailed) server.prepared.clear();
    }
    if (this.ddlAtReady) {
      this.ddlAtReady = false;
      if (!this.requestFailed) this.tenant.ddlEpoch++;
    }

    if (this.pendingSets.length > 0) {
      // A session-level SET that succeeded follows the client to whichever backend serves it next.
      if (!this.requestFailed) {
        for (const { name, value } of this.pendingSets) {
          if (value === null) {
            const startup = this.startupParams.get(name);
            if (startup !== undefined) this.desired.set(name, startup);
            else this.desired.delete(name);
            server.applied.delete(name);
          } else {
            this.desired.set(name, value);
            server.applied.set(name, value);
          }
        }
      }
      this.pendingSets.length = 0;
    }
    if (this.pinAtReady !== null) {
      // Only state that was really created pins (a refused or failed statement created none).
      if (!this.requestFailed) {
        if (this.pinned === null && this.ctx.config.pool_mode.mode !== 'session') this.log.debug({ reason: this.pinAtReady }, 'client pinned to its backend');
        this.pinned ??= this.pinAtReady;
      }
      this.pinAtReady = null;
    }
    if (this.restoreAtReady !== null) {
      // RESET brings a setting back to what the client gave at startup, as PostgreSQL would.
      const names = this.restoreAtReady === 'all' ? [...this.startupParams.keys()] : [...this.restoreAtReady];
      for (const name of names) this.desired.set(name, this.startupParams.get(name)!);
      this.restoreAtReady = null;
      this.reapplyAtReady = true;
    }
    if (this.reapplyAtReady) {
      this.reapplyAtReady = false;
      this.reapply = true;
      server.applied.clear();
    }
    const mode = this.ctx.config.pool_mode.mode;
    if (mode === 'statement' && status !== 'I' && this.expect.length === 0) {
      this.refuseTransactionBlock(server);
      return;
    }
    this.txStatus = status;
    this.toClient(buf, start, end);
    this.emitSynthesized();
    if (this.expect.length === 0) this.latency?.observe((turnNow() - this.requestStartedAt) / 1000);
    if (this.expect.length === 0 && status === 'I' && mode !== 'session' && !this.awaitingSync && this.pinned === null) this.releaseServer(true);
    if (this.expect.length === 0 && status === 'I' && !this.awaitingSync) {
      const reason = this.endingReason();
      if (reason !== null) {
        this.flushToClient();
        this.fatal({ code: '57P01', message: reason });
      }
    }
  }

  /** Why this session must end at its next transaction boundary, or null. */
  private endingReason(): string | null {
    if (this.ctx.shuttingDown) return 'terminating connection: the proxy is shutting down';
    if (this.tenant.removed) return `terminating connection: tenant "${this.tenant.id}" was removed from the configuration`;
    return this.endRequested;
  }

  private endRequested: string | null = null;

  /** Ends the session now if it is between transactions, else at its next transaction boundary. */
  endAtBoundary(reason: string): void {
    this.endRequested = reason;
    this.endIfIdle();
  }

  /**
   * Shutdown, reload and the admin API end sessions at a transaction boundary: now, when the session is
   * between transactions with nothing in flight; otherwise at its next ReadyForQuery with status idle.
   */
  endIfIdle(): void {
    if (this.phase !== 'ready') {
      if (this.phase !== 'closed') this.fatal({ code: '57P01', message: this.endingReason() ?? 'terminating connection' });
      return;
    }
    if (this.expect.length === 0 && this.txStatus === 'I' && !this.awaitingSync && !this.blocked) {
      this.fatal({ code: '57P01', message: this.endingReason() ?? 'terminating connection' });
    }
  }

  /**
   * The client was told a statement failed that the backend completed inside a transaction block: fail the
   * backend's transaction too, so a COMMIT cannot commit it. Returns true when the ReadyForQuery is held
   * back (the one answering the proxy's failing statement goes to the client instead).
   */
  private failServerTransaction(server: ServerConnection): boolean {
    if (this.expect.length > 0) {
      // Requests pipelined behind it are already running in that transaction: only closing it is honest.
      this.log.warn('result limit hit in a pipelined transaction: closing the connection');
      this.flushToClient();
      this.fatal({ code: '54000', message: 'result limit exceeded inside a pipelined transaction; the connection is closed and the transaction rolled back' });
      return true;
    }
    this.flushToClient();
    server.write(query(REFUSED_SQL));
    this.expect.push(Expect.Internal);
    return true;
  }

  /** Statement mode: a transaction block was opened. Roll it back and tell the client why. */
  private refuseTransactionBlock(server: ServerConnection): void {
    this.flushToClient();
    server.detach();
    this.server = null;
    const fields: ErrorFields = {
      severity: 'ERROR',
      code: '25001',
      message: 'transaction blocks are not allowed in statement pooling mode',
      hint: 'Each statement runs on its own; use transaction pooling for BEGIN … COMMIT.',
    };
    server.run(['ROLLBACK']).then(
      () => this.pool!.release(server, true, this.identity!.tenant),
      () => this.pool!.release(server, false, this.identity!.tenant),
    );
    this.txStatus = 'I';
    this.writeClient(Buffer.concat([errorResponse(fields), readyForQuery('I')]));
  }

  serverClosed(conn: ServerConnection, err: Error | null): void {
    if (this.server !== conn) return;
    this.flushToClient();
    this.server = null;
    this.pool!.release(conn, false, this.identity!.tenant);
    this.log.warn({ err: err?.message }, 'backend connection lost while serving the client');
    if (!this.backendFatalRelayed) {
      this.fatal({ code: '08006', message: 'server connection closed unexpectedly' });
      return;
    }
    this.phase = 'closed';
    if (!this.socket.destroyed) this.socket.end();
    this.cleanup();
  }

  // ── cancel and close ───────────────────────────────────────────────────────────────

  /** Forwards a CancelRequest to the backend serving this client now; nothing when none is working for it. */
  cancel(): void {
    const server = this.server;
    if (server !== null && this.expect.length > 0) this.ctx.sendCancel(server);
  }

  private terminate(): void {
    this.phase = 'closed';
    this.socket.end();
    this.cleanup();
  }

  /** Sends a FATAL error and closes. */
  fatal(fields: Omit<ErrorFields, 'severity'>): void {
    if (this.phase === 'closed' && this.socket.destroyed) return;
    this.phase = 'closed';
    if (!this.socket.destroyed) this.socket.end(errorResponse({ severity: 'FATAL', ...fields }));
    this.cleanup();
  }

  private cleanedUp = false;

  /** Gives everything back: the backend (reset or closed), the cancel key, the tenant's count. */
  private cleanup(): void {
    if (this.cleanedUp) return;
    this.cleanedUp = true;
    this.phase = 'closed';
    clearTimeout(this.loginTimer);
    this.ctx.sessions.delete(this);
    this.ctx.running.delete(this);
    if (this.cancelKey !== null) this.ctx.cancels.unregister(this.cancelKey.pid);
    if (this.countedClient) this.identity!.tenant.clients--;
    const server = this.server;
    if (server === null) return;
    this.server = null;
    server.detach();
    // Paused for this client's backpressure: the proxy must still read its answers (ROLLBACK, reset).
    if (server.socket.isPaused()) server.socket.resume();
    const pool = this.pool!;
    const tenant = this.identity!.tenant;
    if (this.expect.length > 0 || this.awaitingSync || this.copyIn || this.blocked) {
      // Mid-request or inside an unsynced extended-protocol exchange, or with the proxy's own queries
      // (a resync) still running on it: the connection cannot be reused.
      // A client that sent Terminate gets its pipelined work finished first (as PostgreSQL does); a lost
      // client's work is cancelled. Either way the backend then closes, and PostgreSQL rolls back.
      if (!this.clientTerminated && this.expect.length > 0) this.ctx.sendCancel(server);
      pool.release(server, false, tenant);
      return;
    }
    const sqls: string[] = [];
    if (server.txStatus !== 'I') sqls.push('ROLLBACK');
    if ((this.ctx.config.pool_mode.mode === 'session' || this.pinned !== null) && this.ctx.config.pool_mode.reset_query.trim() !== '') {
      sqls.push(this.ctx.config.pool_mode.reset_query);
    }
    if (sqls.length === 0) {
      // A cancel still on its way must not land on the next client's statement.
      server.whenNoCancelPending(() => pool.release(server, true, tenant));
      return;
    }
    server.run(sqls).then(
      () => {
        if (sqls.length > 1 || sqls[0] !== 'ROLLBACK') {
          server.applied.clear();
          server.prepared.clear();
        }
        pool.release(server, true, tenant);
      },
      () => pool.release(server, false, tenant),
    );
  }
}

/** A login the proxy refuses, with the FATAL the client gets. */
class LoginRefused extends Error {
  constructor(readonly fields: Omit<ErrorFields, 'severity'>) {
    super(fields.message);
  }
}


/** A SCRAM verifier for a plaintext auth_file entry: one salt per role for the process, derived once. */
const plainSalts = new Map<string, Buffer>();
function plainVerifier(role: string, password: string): Promise<ScramKeys> {
  let salt = plainSalts.get(role);
  if (salt === undefined) {
    salt = randomBytes(16);
    plainSalts.set(role, salt);
  }
  return cachedDerive(password, salt, 4096);
}
