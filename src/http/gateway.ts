// http/ owns the proxy's HTTP listeners. This file is the HTTP SQL endpoint ([http_gateway]):
// POST /v1/query and POST /v1/transaction. A request is identified (API key + tenant header, or a JWT),
// then runs as an ordinary ClientSession over an in-process stream, so it meets exactly the isolation,
// pools, token bucket, permissions, limits and metrics a wire client of the same tenant meets. Values are
// always bound as parameters of the extended protocol, never spliced into SQL.
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Duplex } from 'node:stream';
import { z } from 'zod';
import { TokenRefused } from '../auth/jwt.js';
import type { HttpGatewayConfig } from '../config/schema.js';
import { MessageFramer, type FrameSink } from '../protocol/framer.js';
import {
  bindText,
  copyFail,
  decodeDataRow,
  decodeErrorFields,
  describePortal,
  execute,
  Msg,
  parse,
  query,
  readCString,
  startupMessage,
  SYNC,
  TERMINATE,
} from '../protocol/messages.js';
import { isLoopback, type ServerTlsMaterial } from '../protocol/tls.js';
import type { ProxyServer } from '../server.js';
import { ClientSession } from '../session/client-session.js';
import { IdentifyError, type Identity } from '../tenancy/registry.js';

import { listenHttp, type HttpListener } from './listen.js';

const JsonValue: z.ZodType<unknown> = z.unknown();
const QuerySchema = z.strictObject({
  query: z.string().min(1),
  // The Bind message counts parameters in 16 bits.
  params: z.array(JsonValue).max(32767).default([]),
});
const QueryRequest = QuerySchema.extend({ arrayMode: z.boolean().default(false) });
const TransactionRequest = z.strictObject({
  queries: z.array(QuerySchema).min(1),
  arrayMode: z.boolean().default(false),
});

/** After request_timeout_secs has cancelled a statement, how long the answer may take before the session is ended. */
const TIMEOUT_GRACE_MS = 2000;

/** An answer the gateway gives instead of a result: an HTTP status and PostgreSQL's error fields. */
class HttpFailure extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly extra: Record<string, string> = {},
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

export interface Field {
  name: string;
  dataTypeID: number;
}

export interface StatementResult {
  command: string;
  rowCount: number | null;
  fields: Field[];
  rows: (Record<string, string | null> | (string | null)[])[];
  rowAsArray: boolean;
}

function badBody(error: z.ZodError): HttpFailure {
  return new HttpFailure(400, '08P01', `bad request body: ${error.issues.map((i) => `${i.path.join('.') || '(body)'}: ${i.message}`).join('; ')}`);
}

/** HTTP status for a SQLSTATE (the JSON body carries the SQLSTATE itself). */
function statusFor(code: string): number {
  if (code.startsWith('28')) return 401;
  if (code === '42501' || code === '25006') return 403;
  if (code === '53400' || code === '53300') return 429;
  if (code === '57014') return 504;
  if (code === '40001' || code === '40P01') return 409; // serialization failure, deadlock: retry
  if (code.startsWith('08') || code.startsWith('57P') || code === '53100' || code === '53200') return 503;
  if (code.startsWith('58') || code.startsWith('XX')) return 500;
  return 400;
}

/**
 * Two ends of an in-process byte stream: what one writes, the other reads. A write completes only once
 * the reader has room, so a slow reader pauses the writer (the session then pauses its backend).
 */
type End = Duplex & { remoteAddress?: string; remotePort?: number; releaseWriter?: (() => void) | null };

function streamPair(remote: { address: string | undefined; port: number | undefined }): [End, End] {
  const ends: End[] = [];
  const make = (peer: () => End): End => {
    const end: End = new Duplex({
      read() {
        const release = end.releaseWriter;
        end.releaseWriter = null;
        release?.();
      },
      write(chunk: Buffer, _enc, cb) {
        const p = peer();
        if (p.destroyed) return cb();
        if (p.push(chunk)) cb();
        else p.releaseWriter = cb;
      },
      final(cb) {
        peer().push(null);
        cb();
      },
      destroy(err, cb) {
        const p = peer();
        if (!p.destroyed) p.destroy();
        const release = end.releaseWriter;
        end.releaseWriter = null;
        release?.();
        cb(err);
      },
    });
    return end;
  };
  ends.push(make(() => ends[1]!), make(() => ends[0]!));
  Object.assign(ends[1]!, { remoteAddress: remote.address, remotePort: remote.port });
  return [ends[0]!, ends[1]!];
}

/**
 * The gateway's side of one request's session: a minimal PostgreSQL client over the in-process stream,
 * one round trip (up to ReadyForQuery) at a time.
 */
class GatewayClient implements FrameSink {
  private readonly framer = new MessageFramer();
  private waiter: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private closedWith: HttpFailure | null = null;
  private closed = false;
  private current: StatementResult = { command: '', rowCount: null, fields: [], rows: [], rowAsArray: false };
  private error: HttpFailure | null = null;
  /** The gateway ended a COPY FROM STDIN itself: PostgreSQL's "COPY from stdin failed" is not the caller's timeout. */
  private copyRefused = false;
  pid = 0;
  secret = 0;
  txStatus = 'I';

  /** Row bytes held for the response so far, against http_gateway.max_response_bytes. */
  private held = 0;
  /** Called once when the response outgrows its cap (the request is then abandoned). */
  onTooLarge: (() => void) | null = null;

  constructor(
    private readonly stream: Duplex,
    private readonly arrayMode: boolean,
    private readonly maxResponseBytes: number,
  ) {
    stream.on('error', () => undefined); // an in-process stream has no I/O to fail; destroy() is the only end
    stream.on('data', (chunk: Buffer) => {
      try {
        this.framer.feed(chunk, this);
      } catch (err) {
        this.fail(new HttpFailure(500, 'XX000', `bad message from the session: ${(err as Error).message}`));
      }
    });
    stream.on('end', () => this.ended());
    stream.on('close', () => this.ended());
  }

  private fail(err: HttpFailure): void {
    this.closedWith ??= err;
    this.ended();
  }

  /** The session's end is an error only for a round trip still waiting on it (built then, not per request). */
  private ended(): void {
    this.closed = true;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(this.closure());
  }

  private closure(): HttpFailure {
    return (this.closedWith ??= new HttpFailure(503, '08006', 'the session ended unexpectedly'));
  }

  /** Sends `messages` and waits for ReadyForQuery. Resolves to the last statement's result, or throws its error. */
  async roundTrip(messages: Buffer): Promise<StatementResult> {
    if (this.closed || this.closedWith !== null) throw this.closure();
    this.current = { command: '', rowCount: null, fields: [], rows: [], rowAsArray: this.arrayMode };
    this.error = null;
    await new Promise<void>((resolve, reject) => {
      this.waiter = { resolve, reject };
      this.stream.write(messages);
    });
    if (this.error !== null) throw this.error;
    return this.current;
  }

  message(buf: Buffer, start: number, end: number): void {
    switch (buf[start]) {
      case Msg.RowDescription: {
        const n = buf.readInt16BE(start + 5);
        let o = start + 7;
        const fields: Field[] = [];
        for (let i = 0; i < n; i++) {
          const [name, next] = readCString(buf, o, end);
          fields.push({ name, dataTypeID: buf.readInt32BE(next + 6) });
          o = next + 18;
        }
        this.current.fields = fields;
        break;
      }
      case Msg.DataRow: {
        this.held += end - start;
        if (this.held > this.maxResponseBytes) {
          if (this.error === null) {
            this.error = new HttpFailure(413, '54000', `result is larger than http_gateway.max_response_bytes (${this.maxResponseBytes})`);
            this.onTooLarge?.();
          }
          break;
        }
        const values = decodeDataRow(buf, start, end);
        if (this.arrayMode) this.current.rows.push(values);
        else {
          const row: Record<string, string | null> = {};
          this.current.fields.forEach((f, i) => (row[f.name] = values[i] ?? null));
          this.current.rows.push(row);
        }
        break;
      }
      case Msg.CommandComplete: {
        const tag = readCString(buf, start + 5, end)[0];
        const parts = tag.split(' ');
        const last = Number(parts[parts.length - 1]);
        this.current.command = parts[0]!;
        this.current.rowCount = Number.isInteger(last) && parts.length > 1 ? last : null;
        break;
      }
      case Msg.ErrorResponse: {
        const f = decodeErrorFields(buf, start, end);
        const code = f.get('C') ?? 'XX000';
        const extra: Record<string, string> = {};
        for (const [k, name] of [['D', 'detail'], ['H', 'hint'], ['P', 'position']] as const) {
          const v = f.get(k);
          if (v !== undefined) extra[name] = v;
        }
        const retry = code === '53400' ? /Retry after (\d+) ms/.exec(f.get('D') ?? '') : null;
        const headers: Record<string, string> = retry !== null ? { 'retry-after': String(Math.max(1, Math.ceil(Number(retry[1]) / 1000))) } : {};
        const failure = this.copyRefused
          ? new HttpFailure(400, '0A000', 'COPY FROM STDIN is not available over HTTP; use INSERT with parameters')
          : new HttpFailure(statusFor(code), code, f.get('M') ?? 'error', extra, headers);
        this.copyRefused = false;
        if ((f.get('V') ?? f.get('S')) === 'FATAL') this.closedWith ??= failure;
        this.error ??= failure;
        break;
      }
      case Msg.CopyInResponse:
        this.copyRefused = true;
        // Nothing to send: end the COPY at once rather than leave the backend waiting for data.
        // PostgreSQL ignores the Sync sent before copy-in began, so the CopyFail needs one of its own.
        // Written after this delivery returns: the session is still in the middle of flushing to us.
        queueMicrotask(() => {
          if (!this.stream.destroyed) this.stream.write(Buffer.concat([copyFail('COPY FROM STDIN is not available over HTTP'), SYNC]));
        });
        break;
      case Msg.BackendKeyData:
        this.pid = buf.readInt32BE(start + 5);
        this.secret = buf.readInt32BE(start + 9);
        break;
      case Msg.ReadyForQuery: {
        this.txStatus = String.fromCharCode(buf[start + 5]!);
        const w = this.waiter;
        this.waiter = null;
        w?.resolve();
        break;
      }
      default:
        break; // ParseComplete, BindComplete, NoData, ParameterStatus, NoticeResponse, Authentication: nothing to keep
    }
  }

  batchEnd(): void {}
}

/** JSON values become text parameters; PostgreSQL infers their types from the statement. */
function toParam(v: unknown): string | null {
  if (v === null || v === undefined) return null;
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'bigint') return String(v);
  return JSON.stringify(v);
}

function statementMessages(q: { query: string; params: unknown[] }): Buffer {
  return Buffer.concat([parse('', q.query), bindText('', '', q.params.map(toParam)), describePortal(''), execute(''), SYNC]);
}

function sha256(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

export class HttpGateway {
  private constructor(
    private readonly proxy: ProxyServer,
    readonly listener: HttpListener,
  ) {}

  static async start(proxy: ProxyServer, at: { host: string; port: number }, tls: ServerTlsMaterial | null): Promise<HttpGateway> {
    let gateway: HttpGateway | null = null;
    const listener = await listenHttp(at, (req, res) => gateway?.handle(req, res), tls);
    gateway = new HttpGateway(proxy, listener);
    return gateway;
  }


  private get config(): HttpGatewayConfig {
    return this.proxy.config.http_gateway!;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    this.serve(req, res).catch((err: unknown) => {
      const failure = err instanceof HttpFailure ? err : new HttpFailure(500, 'XX000', 'internal error in the proxy');
      if (!(err instanceof HttpFailure)) this.proxy.log.error({ err: err instanceof Error ? err.stack : String(err) }, 'HTTP request failed');
      this.reply(res, failure.status, { error: { message: failure.message, code: failure.code, ...failure.extra } }, failure.headers);
    });
  }

  private reply(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    if (res.headersSent || res.destroyed) return;
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers });
    res.end(text);
  }

  private async serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/v1/query' && path !== '/v1/transaction') throw new HttpFailure(404, '42704', `no such endpoint: ${path}`);
    if (req.method !== 'POST') throw new HttpFailure(405, '0A000', `${path} takes POST`, {}, { allow: 'POST' });
    const encrypted = (req.socket as { encrypted?: boolean }).encrypted === true;
    if (!encrypted && !isLoopback(req.socket.remoteAddress) && !this.config.allow_plaintext_remote) {
      throw new HttpFailure(403, '28000', 'credentials are accepted only over HTTPS or from loopback', { hint: 'Set http_gateway.tls = true (or allow_plaintext_remote behind a TLS-terminating proxy).' });
    }
    // Who is asking is settled before the body is read: unauthenticated callers cannot make the proxy buffer.
    const identity = await this.identify(req);
    try {
      await this.run(req, res, path, identity);
    } catch (err) {
      identity.tenant.stats.httpFailed++;
      throw err;
    } finally {
      identity.tenant.stats.httpRequests++;
    }
  }

  private async run(req: IncomingMessage, res: ServerResponse, path: string, identity: Identity): Promise<void> {
    const body = await this.readBody(req);
    let json: unknown;
    try {
      json = JSON.parse(body);
    } catch {
      throw new HttpFailure(400, '08P01', 'request body is not valid JSON');
    }
    if (path === '/v1/query') {
      const parsed = QueryRequest.safeParse(json);
      if (!parsed.success) throw badBody(parsed.error);
      const result = await this.withSession(req, identity, parsed.data.arrayMode, (c) => c.roundTrip(statementMessages(parsed.data)));
      this.reply(res, 200, result);
      return;
    }
    const parsed = TransactionRequest.safeParse(json);
    if (!parsed.success) throw badBody(parsed.error);
    parsed.data.queries.forEach((q, i) => {
      // All or nothing holds only if no query ends the transaction itself (COMMIT, ROLLBACK, AND CHAIN,
      // PREPARE TRANSACTION): refused before anything runs. Savepoints stay usable.
      const facts = this.proxy.ctx.statements.lookup(q.query);
      if (Array.isArray(facts) && facts.some((f) => f.endsTransaction)) {
        throw new HttpFailure(400, '25000', `query ${i} ends the transaction; /v1/transaction issues BEGIN and COMMIT itself`, { query: String(i) });
      }
    });
    const results = await this.withSession(req, identity, parsed.data.arrayMode, async (c) => {
      await c.roundTrip(query('BEGIN'));
      const out: StatementResult[] = [];
      for (const [i, q] of parsed.data.queries.entries()) {
        try {
          out.push(await c.roundTrip(statementMessages(q)));
        } catch (err) {
          if (c.txStatus !== 'I') await c.roundTrip(query('ROLLBACK')).catch(() => undefined);
          if (err instanceof HttpFailure) throw new HttpFailure(err.status, err.code, err.message, { ...err.extra, query: String(i) }, err.headers);
          throw err;
        }
        if (c.txStatus !== 'T') {
          // Unreachable with transaction statements refused above; kept so a surprise can never pass as success.
          throw new HttpFailure(500, 'XX000', `query ${i} ended the transaction unexpectedly`);
        }
      }
      const commit = await c.roundTrip(query('COMMIT'));
      if (commit.command !== 'COMMIT') throw new HttpFailure(400, '40000', 'the transaction was rolled back');
      return out;
    });
    this.reply(res, 200, { results });
  }

  private async readBody(req: IncomingMessage): Promise<string> {
    const max = this.config.max_body_bytes;
    const declared = Number(req.headers['content-length'] ?? 0);
    if (declared > max) throw new HttpFailure(413, '54000', `request body is larger than max_body_bytes (${max})`, {}, { connection: 'close' });
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > max) throw new HttpFailure(413, '54000', `request body is larger than max_body_bytes (${max})`, {}, { connection: 'close' });
      chunks.push(chunk);
    }
    return Buffer.concat(chunks).toString('utf8');
  }

  /** Authorizes the request and names its tenant; throws 401/403 for anything less than proof. */
  private async identify(req: IncomingMessage): Promise<Identity> {
    const gw = this.config;
    const ctx = this.proxy.ctx;
    const auth = req.headers.authorization;
    const bearer = auth !== undefined ? /^Bearer\s+(\S+)\s*$/i.exec(auth)?.[1] : undefined;
    if (bearer === undefined) {
      throw new HttpFailure(401, '28000', `missing credentials: send Authorization: Bearer <${gw.identify_by === 'header' ? 'API key' : 'JWT'}>`, {}, { 'www-authenticate': 'Bearer' });
    }
    let tenantId: string;
    if (gw.identify_by === 'jwt_claim') {
      if (ctx.jwt === null) throw new HttpFailure(500, 'XX000', 'http_gateway.identify_by = "jwt_claim" but no JWT key is configured');
      try {
        tenantId = (await ctx.jwt.verify(bearer)).tenantId;
      } catch (err) {
        if (err instanceof TokenRefused) throw new HttpFailure(401, err.code, err.message, {}, { 'www-authenticate': 'Bearer error="invalid_token"' });
        throw err;
      }
    } else {
      const header = req.headers[gw.tenant_header.toLowerCase()];
      const key = sha256(bearer);
      const entry = gw.api_keys.find((k) => timingSafeEqual(sha256(k.key), key));
      if (entry === undefined) throw new HttpFailure(401, '28P01', 'invalid API key', {}, { 'www-authenticate': 'Bearer error="invalid_token"' });
      if (typeof header !== 'string' || header === '') throw new HttpFailure(400, '28000', `missing ${gw.tenant_header} header naming the tenant`);
      if (!entry.tenants.includes(header)) throw new HttpFailure(403, '42501', `this API key is not allowed for tenant "${header}"`);
      tenantId = header;
    }
    let identity: Identity;
    try {
      identity = ctx.tenants.identifyTenant(tenantId, gw.role, `${tenantId}${ctx.config.multi_tenancy.identification.separator}${gw.role}`, undefined);
    } catch (err) {
      if (err instanceof IdentifyError) throw new HttpFailure(statusFor(err.code) === 400 ? 403 : statusFor(err.code), err.code, err.message);
      throw err;
    }
    if (!(await ctx.credentials.canLogInWithoutClient(gw.role))) {
      this.proxy.log.error({ role: gw.role }, 'http_gateway.role has no usable password in auth_file (plain or md5 needed)');
      throw new HttpFailure(500, '28000', `the proxy holds no usable backend password for role "${gw.role}"`);
    }
    return identity;
  }

  /**
   * Runs `work` on a fresh session of `identity`'s tenant. The request timeout and a client that hangs up
   * cancel what runs on the backend; the session always ends, returning its backend clean.
   */
  private async withSession<T>(req: IncomingMessage, identity: Identity, arrayMode: boolean, work: (c: GatewayClient) => Promise<T>): Promise<T> {
    const ctx = this.proxy.ctx;
    const gw = this.config;
    if (ctx.shuttingDown) throw new HttpFailure(503, '57P01', 'the proxy is shutting down');
    const [mine, theirs] = streamPair({ address: req.socket.remoteAddress, port: req.socket.remotePort });
    const session = new ClientSession(theirs, ctx, identity);
    ctx.sessions.add(session);
    const client = new GatewayClient(mine, arrayMode, gw.max_response_bytes);
    let abandoned: HttpFailure | null = null;
    // Abandoning destroys the stream: the session's cleanup cancels what runs and closes or resets its backend.
    const abandon = (why: () => HttpFailure): void => {
      abandoned ??= why();
      if (client.pid !== 0) ctx.cancels.cancel(client.pid, client.secret);
      mine.destroy();
    };
    client.onTooLarge = () => abandon(() => new HttpFailure(413, '54000', `result is larger than http_gateway.max_response_bytes (${gw.max_response_bytes})`));
    const timedOut = (): HttpFailure => new HttpFailure(504, '57014', `canceling statement due to http_gateway.request_timeout_secs (${gw.request_timeout_secs} s)`);
    let timeoutSent = false;
    let grace: NodeJS.Timeout | null = null;
    const timer = setTimeout(() => {
      timeoutSent = true;
      // Still logging in (waiting for a backend): nothing has run, end it now.
      if (client.pid === 0) return abandon(timedOut);
      // Otherwise cancel, as statement_timeout would: a running statement fails with 57014, and one
      // PostgreSQL does not interrupt (a COMMIT under way) finishes and is answered, so a committed
      // transaction is never reported as failed. What is stuck elsewhere is ended after a grace period.
      ctx.cancels.cancel(client.pid, client.secret);
      grace = setTimeout(() => abandon(timedOut), TIMEOUT_GRACE_MS);
    }, gw.request_timeout_secs * 1000);
    const onAbort = (): void => abandon(() => new HttpFailure(499, '57014', 'client closed the request'));
    req.socket.once('close', onAbort);
    try {
      try {
        await client.roundTrip(startupMessage({ user: identity.clientUser, database: identity.tenant.database, application_name: 'heliosproxy-http' }));
      } catch (err) {
        // The caller was authorized already: a login refused by the backend is the proxy's configuration.
        if (err instanceof HttpFailure && err.code.startsWith('28')) {
          this.proxy.log.error({ role: identity.role, code: err.code, reason: err.message }, 'http_gateway backend login failed');
          throw new HttpFailure(500, err.code, `the backend refused the proxy's login as "${identity.role}"`);
        }
        throw err;
      }
      return await work(client);
    } catch (err) {
      if (abandoned !== null) throw abandoned;
      if (timeoutSent && err instanceof HttpFailure && err.code === '57014') throw timedOut();
      throw err;
    } finally {
      clearTimeout(timer);
      if (grace !== null) clearTimeout(grace);
      req.socket.off('close', onAbort);
      if (!mine.destroyed) mine.end(TERMINATE);
    }
  }
}
