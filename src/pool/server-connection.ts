// pool/ owns backend connections and the pools that hold them. This file is one backend connection:
// its login (StartupMessage, authentication, ParameterStatus, BackendKeyData), the session state the proxy
// applied to it, and two ways of talking to it: internal queries while idle, or a relay attached by the
// ClientSession it currently serves.
import { isIP, Socket, connect as netConnect } from 'node:net';
import { performance } from 'node:perf_hooks';
import { connect as tlsConnect } from 'node:tls';
import type { BackendTlsPolicy } from '../protocol/tls.js';
import type { Secret } from '../auth/credentials.js';
import { md5Response, md5Secret } from '../auth/md5.js';
import { ScramClientExchange, type ScramKeys } from '../auth/scram.js';
import { adoptSocket, type ByteStream } from '../io/native-socket.js';
import { MessageFramer, ProtocolViolation, type FrameSink } from '../protocol/framer.js';
import {
  AuthCode,
  Msg,
  decodeDataRow,
  decodeErrorFields,
  passwordMessage,
  query,
  readCString,
  saslInitialResponse,
  sslRequest,
  startupMessage,
  TERMINATE,
  type TxStatus,
} from '../protocol/messages.js';

export interface BackendTarget {
  host: string;
  port: number;
  database: string;
  role: string;
  /** [backend_tls]: whether to ask for TLS and how to check the certificate. */
  tls?: BackendTlsPolicy;
  /** Move the connection onto the native socket layer once logged in (plaintext only). */
  nativeSocket?: boolean;
}

/**
 * A host that starts with '/' is the directory of PostgreSQL's Unix-domain socket, as libpq and PgBouncer
 * read it: the socket is <dir>/.s.PGSQL.<port>. Beside PostgreSQL it spares every message a trip through
 * the TCP stack.
 */
export function isSocketDirectory(host: string): boolean {
  return host.startsWith('/');
}

/** Where a backend listens, for messages: host:port, or the socket's path. */
export function backendLabel(host: string, port: number): string {
  return isSocketDirectory(host) ? `${host.replace(/\/+$/, '')}/.s.PGSQL.${port}` : `${host}:${port}`;
}

/** Opens a connection to a backend (TCP, or its Unix-domain socket). */
export function connectBackend(host: string, port: number): Socket {
  return isSocketDirectory(host) ? netConnect({ path: backendLabel(host, port) }) : netConnect({ host, port, noDelay: true });
}

/** An ErrorResponse from the backend, kept whole so it can be relayed to a client unchanged. */
export class BackendError extends Error {
  constructor(
    readonly fields: Map<string, string>,
    readonly raw: Buffer,
  ) {
    super(fields.get('M') ?? 'backend error');
  }
  get code(): string {
    return this.fields.get('C') ?? 'XX000';
  }
}

/** The ClientSession a connection currently serves: gets every backend message, and hears of its death. */
export interface ServerRelay extends FrameSink {
  serverClosed(conn: ServerConnection, err: Error | null): void;
}

/** The connection could not be made or died: not an answer from PostgreSQL. */
export class BackendUnavailable extends Error {}

type InternalWaiter = { resolve: (r: QueryResult) => void; reject: (e: Error) => void; result: QueryResult };

export interface QueryResult {
  rows: (string | null)[][];
  commands: string[];
  error: BackendError | null;
}

let nextId = 1;
const INTERNAL_QUERY_TIMEOUT_MS = 10_000;

export class ServerConnection implements FrameSink {
  readonly id = nextId++;
  readonly params = new Map<string, string>();
  pid = 0;
  secretKey = 0;
  txStatus: TxStatus = 'I';
  /** Tenant (or passthrough owner) whose session state this connection carries; null when fresh or reset. */
  owner: string | null = null;
  /** GUCs the proxy has SET since the last reset, lower-cased names. */
  readonly applied = new Map<string, string>();
  /** Proxy-named prepared statements present on this connection, least recently used first. */
  readonly prepared = new Map<string, true>();
  /**
   * A prepared statement here went stale (0A000: a table it reads changed shape). The connection is
   * re-synced with DEALLOCATE ALL before its next request, so every statement is prepared afresh.
   */
  staleStatements = false;
  // performance.now() (ms): monotonic, and cheaper than Date.now() on the checkout path.
  readonly createdAt = performance.now();
  /** When the pool last got it back: idle timeouts and test_on_acquire count from here. */
  lastUsedAt = performance.now();
  closed = false;
  /** Keys derived while logging in with a plaintext password (lets the proxy check later logins locally). */
  derivedKeys: ScramKeys | null = null;
  /**
   * PostgreSQL asked for the password at login. Password passthrough relies on it: a backend that trusts
   * the proxy's connection (pg_hba trust or peer) would accept any password.
   */
  passwordChecked = false;
  /** CancelRequests sent for this backend and not yet delivered; it must not serve anyone else meanwhile. */
  cancelsInFlight = 0;
  private afterCancels: (() => void)[] = [];

  private readonly framer = new MessageFramer();
  private relay: ServerRelay | null = null;
  private waiters: InternalWaiter[] = [];
  private closeListeners: ((err: Error | null) => void)[] = [];

  private constructor(
    public socket: ByteStream,
    readonly target: BackendTarget,
  ) {}

  /** Opens, authenticates and waits for the first ReadyForQuery. Rejects with BackendError or BackendUnavailable. */
  static connect(target: BackendTarget, secret: Secret, timeoutMs: number): Promise<ServerConnection> {
    return new Promise((resolve, reject) => {
      const where = backendLabel(target.host, target.port);
      let socket: Socket = connectBackend(target.host, target.port);
      let settled = false;
      const fail = (err: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      const timer = setTimeout(() => fail(new BackendUnavailable(`timed out connecting to ${where} after ${timeoutMs} ms`)), timeoutMs);
      socket.on('error', (err) => fail(new BackendUnavailable(`cannot connect to ${where}: ${err.message}`)));
      socket.once('close', () => fail(new BackendUnavailable(`connection to ${where} closed during login`)));

      const login = (): void => {
        const conn = new ServerConnection(socket, target);
        const handshake = new LoginHandshake(conn, target, secret);
        const loginSink: FrameSink = {
          message: (buf, start, end) => {
            if (settled) return;
            handshake.message(buf, start, end).then(
              (done) => {
                if (!done || settled) return;
                settled = true;
                clearTimeout(timer);
                conn.derivedKeys = handshake.derivedKeys;
                conn.passwordChecked = handshake.passwordChecked;
                socket.removeAllListeners('data');
                socket.removeAllListeners('error');
                socket.removeAllListeners('close');
                if (target.nativeSocket === true) conn.socket = adoptSocket(socket) ?? socket;
                conn.listen();
                resolve(conn);
              },
              (err: Error) => fail(err),
            );
          },
          batchEnd: () => {},
        };
        const loginFramer = new MessageFramer();
        socket.on('data', (chunk: Buffer) => {
          try {
            loginFramer.feed(chunk, loginSink);
          } catch (err) {
            fail(err as Error);
          }
        });
        socket.write(startupMessage({ user: target.role, database: target.database }));
      };

      const tls = target.tls;
      socket.once('connect', () => {
        // PostgreSQL has no TLS on its Unix-domain socket (libpq skips it there too); the config loader
        // refuses a backend_tls mode that requires it for such a host.
        if (tls === undefined || !tls.request || isSocketDirectory(target.host)) return login();
        socket.write(sslRequest());
        socket.once('data', (answer: Buffer) => {
          if (settled) return;
          // One byte, and nothing after it: bytes past the answer would have come from a man in the middle.
          if (answer.length !== 1 || (answer[0] !== 0x53 && answer[0] !== 0x4e)) {
            return fail(new BackendUnavailable(`backend ${where} sent an invalid answer to SSLRequest`));
          }
          if (answer[0] === 0x4e) {
            if (tls.required) return fail(new BackendUnavailable(`backend ${where} does not support TLS, and backend_tls.mode requires it`));
            return login();
          }
          const plain = socket;
          plain.removeAllListeners('error');
          plain.removeAllListeners('close');
          // host: what verify-full checks the certificate against (an IP address against its IP SANs);
          // servername (SNI) only for names, as TLS forbids addresses there.
          const secure = tlsConnect({ ...tls.options, socket: plain, host: target.host, ...(isIP(target.host) === 0 ? { servername: target.host } : {}) });
          socket = secure;
          secure.on('error', (err) => fail(new BackendUnavailable(`TLS with backend ${where} failed: ${err.message}`)));
          secure.once('close', () => fail(new BackendUnavailable(`connection to ${where} closed during login`)));
          secure.once('secureConnect', () => {
            if (!settled) login();
          });
        });
      });
    });
  }

  private listen(): void {
    this.socket.on('data', (chunk: Buffer) => {
      try {
        this.framer.feed(chunk, this);
      } catch (err) {
        this.destroy(err instanceof ProtocolViolation ? err : new Error(String(err)));
      }
    });
    this.socket.on('error', (err) => this.destroy(err));
    this.socket.once('close', () => this.destroy(new BackendUnavailable('server closed the connection unexpectedly')));
  }

  /** Hands every message from the backend to `relay` until detach(). */
  attach(relay: ServerRelay): void {
    this.relay = relay;
  }

  detach(): void {
    this.relay = null;
  }

  get attached(): boolean {
    return this.relay !== null;
  }

  write(buf: Buffer): boolean {
    return this.socket.write(buf);
  }

  /** Runs `fn` once no cancel for this backend is in flight (at once when none is). */
  whenNoCancelPending(fn: () => void): void {
    if (this.cancelsInFlight === 0) fn();
    else this.afterCancels.push(fn);
  }

  cancelDelivered(): void {
    if (--this.cancelsInFlight > 0) return;
    for (const fn of this.afterCancels.splice(0)) fn();
  }

  onClose(listener: (err: Error | null) => void): void {
    this.closeListeners.push(listener);
  }

  /**
   * Runs each SQL string as its own simple Query, pipelined, and resolves when the last ReadyForQuery
   * arrives. Only while no relay is attached. Rejects with the first BackendError.
   */
  async run(sqls: string[]): Promise<QueryResult[]> {
    if (this.relay !== null) throw new Error('internal query on an attached server connection');
    this.armInternalTimeout();
    const results = sqls.map(
      (sql) =>
        new Promise<QueryResult>((resolve, reject) => {
          this.waiters.push({ resolve, reject, result: { rows: [], commands: [], error: null } });
          this.socket.write(query(sql));
        }),
    );
    const all = await Promise.all(results);
    this.disarmInternalTimeout();
    const failed = all.find((r) => r.error !== null);
    if (failed?.error) throw failed.error;
    return all;
  }

  /** Writes pre-built messages (e.g. an extended-protocol query) and collects results up to one ReadyForQuery. */
  exchange(messages: Buffer): Promise<QueryResult> {
    if (this.relay !== null) return Promise.reject(new Error('internal query on an attached server connection'));
    this.armInternalTimeout();
    return new Promise<QueryResult>((resolve, reject) => {
      this.waiters.push({
        resolve: (r) => {
          this.disarmInternalTimeout();
          resolve(r);
        },
        reject,
        result: { rows: [], commands: [], error: null },
      });
      this.socket.write(messages);
    });
  }

  private internalTimer: NodeJS.Timeout | null = null;

  /**
   * The proxy's own queries (reset, SET, checks, auth_query) are tiny: a backend that does not answer them
   * in time is wedged or gone, and is destroyed rather than waited on forever.
   */
  private armInternalTimeout(): void {
    if (this.internalTimer !== null) return;
    this.internalTimer = setTimeout(() => this.destroy(new BackendUnavailable(`backend did not answer the proxy's own query within ${INTERNAL_QUERY_TIMEOUT_MS / 1000} s`)), INTERNAL_QUERY_TIMEOUT_MS);
    this.internalTimer.unref();
  }

  private disarmInternalTimeout(): void {
    if (this.internalTimer === null || this.waiters.length > 0) return;
    clearTimeout(this.internalTimer);
    this.internalTimer = null;
  }

  // FrameSink: per message, so a relay detached mid-chunk never sees what follows its release.
  message(buf: Buffer, start: number, end: number): void {
    const relay = this.relay;
    if (relay !== null) relay.message(buf, start, end);
    else this.internalMessage(buf, start, end);
  }

  batchEnd(): void {
    this.relay?.batchEnd();
  }

  /** Internal queries: collects rows and completions until ReadyForQuery. */
  private internalMessage(buf: Buffer, start: number, end: number): void {
    const type = buf[start]!;
    if (type === Msg.ParameterStatus) {
      this.noteParameterStatus(buf, start, end);
      return;
    }
    const w = this.waiters[0];
    switch (type) {
      case Msg.DataRow:
        w?.result.rows.push(decodeDataRow(buf, start, end));
        break;
      case Msg.CommandComplete:
        w?.result.commands.push(readCString(buf, start + 5, end)[0]);
        break;
      case Msg.ErrorResponse:
        if (w !== undefined && w.result.error === null) {
          w.result.error = new BackendError(decodeErrorFields(buf, start, end), Buffer.from(buf.subarray(start, end)));
        }
        break;
      case Msg.ReadyForQuery:
        this.txStatus = String.fromCharCode(buf[start + 5]!) as TxStatus;
        this.waiters.shift()?.resolve(w!.result);
        break;
      default:
        break; // notices, RowDescription and the like: nothing an internal query needs
    }
  }

  /** Tracks ParameterStatus so ClientSessions can be told the backend's values. */
  noteParameterStatus(buf: Buffer, start: number, end: number): void {
    const [name, next] = readCString(buf, start + 5, end);
    if (next < 0) return;
    this.params.set(name, readCString(buf, next, end)[0]);
  }

  /** Closes politely: Terminate, then end the socket. */
  /**
   * Closes politely: Terminate after whatever was already written, so PostgreSQL finishes a request in
   * flight first (as it would for a client that pipelined a query before its own Terminate).
   */
  close(): void {
    if (this.closed) return;
    if (!this.socket.destroyed) {
      this.socket.end(TERMINATE);
      setTimeout(() => this.socket.destroy(), 30_000).unref();
    }
    this.markClosed(null);
  }

  destroy(err: Error | null): void {
    if (this.closed) return;
    this.socket.destroy();
    this.markClosed(err);
  }

  private markClosed(err: Error | null): void {
    this.closed = true;
    if (this.internalTimer !== null) clearTimeout(this.internalTimer);
    const failure = err ?? new BackendUnavailable('server connection closed');
    for (const w of this.waiters.splice(0)) w.reject(failure);
    const relay = this.relay;
    this.relay = null;
    relay?.serverClosed(this, err);
    for (const l of this.closeListeners.splice(0)) l(err);
  }
}


/** The login conversation with a backend, one message at a time. */
class LoginHandshake {
  private scram: ScramClientExchange | null = null;
  derivedKeys: ScramKeys | null = null;
  /** The backend asked for the password (cleartext, md5 or SCRAM) before AuthenticationOk. */
  passwordChecked = false;

  constructor(
    private readonly conn: ServerConnection,
    private readonly target: BackendTarget,
    private readonly secret: Secret,
  ) {}

  /** Returns true once ReadyForQuery arrives. */
  async message(buf: Buffer, start: number, end: number): Promise<boolean> {
    const type = buf[start]!;
    const sock = this.conn.socket;
    switch (type) {
      case Msg.Authentication: {
        const code = buf.readInt32BE(start + 5);
        switch (code) {
          case AuthCode.Ok:
            return false;
          case AuthCode.CleartextPassword:
            if (this.secret.kind !== 'plain') throw this.cannot('a cleartext password');
            sock.write(passwordMessage(this.secret.password));
            this.passwordChecked = true;
            return false;
          case AuthCode.MD5Password: {
            const salt = buf.subarray(start + 9, start + 13);
            const stored =
              this.secret.kind === 'md5' ? this.secret.hash : this.secret.kind === 'plain' ? md5Secret(this.secret.password, this.target.role) : null;
            if (stored === null) throw this.cannot('md5 authentication');
            sock.write(passwordMessage(md5Response(stored, salt)));
            this.passwordChecked = true;
            return false;
          }
          case AuthCode.SASL: {
            const mechs = buf.toString('utf8', start + 9, end).split('\0');
            if (!mechs.includes('SCRAM-SHA-256')) throw this.cannot(`SASL mechanisms ${mechs.filter(Boolean).join(', ')}`);
            if (this.secret.kind === 'plain') this.scram = new ScramClientExchange({ password: this.secret.password });
            else if (this.secret.kind === 'scram') this.scram = new ScramClientExchange({ keys: this.secret.keys });
            else throw this.cannot('SCRAM-SHA-256 (the proxy only holds an md5 hash for this role)');
            sock.write(saslInitialResponse('SCRAM-SHA-256', this.scram.clientFirst()));
            return false;
          }
          case AuthCode.SASLContinue: {
            if (this.scram === null) throw new ProtocolViolation('unexpected SASLContinue');
            const final = await this.scram.clientFinal(Buffer.from(buf.subarray(start + 9, end)));
            this.derivedKeys = this.scram.derived;
            sock.write(passwordMessage(final));
            return false;
          }
          case AuthCode.SASLFinal:
            if (this.scram === null || !this.scram.verifyServerFinal(buf.subarray(start + 9, end))) {
              throw new BackendUnavailable('backend SCRAM server signature did not verify');
            }
            this.passwordChecked = true;
            return false;
          default:
            throw this.cannot(`authentication request ${code}`);
        }
      }
      case Msg.ErrorResponse:
        throw new BackendError(decodeErrorFields(buf, start, end), Buffer.from(buf.subarray(start, end)));
      case Msg.ParameterStatus:
        this.conn.noteParameterStatus(buf, start, end);
        return false;
      case Msg.BackendKeyData:
        this.conn.pid = buf.readInt32BE(start + 5);
        this.conn.secretKey = buf.readInt32BE(start + 9);
        return false;
      case Msg.ReadyForQuery:
        this.conn.txStatus = String.fromCharCode(buf[start + 5]!) as TxStatus;
        return true;
      default:
        return false; // NoticeResponse, NegotiateProtocolVersion: nothing to do
    }
  }

  private cannot(what: string): BackendUnavailable {
    return new BackendUnavailable(`backend asked for ${what}, which the proxy cannot answer for role "${this.target.role}"`);
  }
}
