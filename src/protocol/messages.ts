// protocol/ owns the wire format. This file builds the messages the proxy itself originates and decodes
// the few it has to look inside; everything else crosses the proxy as opaque bytes.

export const PROTOCOL_3_0 = 196608;
export const SSL_REQUEST_CODE = 80877103;
export const GSSENC_REQUEST_CODE = 80877104;
export const CANCEL_REQUEST_CODE = 80877102;

/** Message type bytes, named as in the PostgreSQL protocol documentation. */
export const enum Msg {
  // frontend
  Query = 0x51, // Q
  Parse = 0x50, // P
  Bind = 0x42, // B
  Describe = 0x44, // D (frontend) / DataRow (backend)
  Execute = 0x45, // E (frontend) / ErrorResponse (backend)
  Close = 0x43, // C (frontend) / CommandComplete (backend)
  Sync = 0x53, // S (frontend) / ParameterStatus (backend)
  Flush = 0x48, // H (frontend) / CopyOutResponse (backend)
  FunctionCall = 0x46, // F
  CopyData = 0x64, // d
  CopyDone = 0x63, // c
  CopyFail = 0x66, // f
  Terminate = 0x58, // X
  PasswordMessage = 0x70, // p (also SASLInitialResponse / SASLResponse)
  // backend
  Authentication = 0x52, // R
  BackendKeyData = 0x4b, // K
  ParameterStatus = 0x53, // S
  ReadyForQuery = 0x5a, // Z
  RowDescription = 0x54, // T
  DataRow = 0x44, // D
  CommandComplete = 0x43, // C
  EmptyQueryResponse = 0x49, // I
  ErrorResponse = 0x45, // E
  NoticeResponse = 0x4e, // N
  NotificationResponse = 0x41, // A
  ParseComplete = 0x31, // 1
  BindComplete = 0x32, // 2
  CloseComplete = 0x33, // 3
  ParameterDescription = 0x74, // t
  NoData = 0x6e, // n
  PortalSuspended = 0x73, // s
  CopyInResponse = 0x47, // G
  CopyOutResponse = 0x48, // H
  CopyBothResponse = 0x57, // W
  FunctionCallResponse = 0x56, // V
  NegotiateProtocolVersion = 0x76, // v
}

export const enum AuthCode {
  Ok = 0,
  CleartextPassword = 3,
  MD5Password = 5,
  SASL = 10,
  SASLContinue = 11,
  SASLFinal = 12,
}

/** Builds one message into an exactly-sized buffer. */
class MessageWriter {
  private parts: Buffer[] = [];
  private size = 0;

  constructor(private readonly type: number | null) {}

  int32(v: number): this {
    const b = Buffer.allocUnsafe(4);
    b.writeInt32BE(v);
    return this.push(b);
  }
  int16(v: number): this {
    const b = Buffer.allocUnsafe(2);
    b.writeInt16BE(v);
    return this.push(b);
  }
  byte(v: number): this {
    return this.push(Buffer.of(v));
  }
  cstring(s: string): this {
    this.push(Buffer.from(s, 'utf8'));
    return this.push(Buffer.of(0));
  }
  bytes(b: Buffer): this {
    return this.push(b);
  }
  private push(b: Buffer): this {
    this.parts.push(b);
    this.size += b.length;
    return this;
  }

  done(): Buffer {
    const header = this.type === null ? 4 : 5;
    const out = Buffer.allocUnsafe(header + this.size);
    let o = 0;
    if (this.type !== null) out[o++] = this.type;
    out.writeInt32BE(this.size + 4, o);
    o += 4;
    for (const p of this.parts) {
      p.copy(out, o);
      o += p.length;
    }
    return out;
  }
}

export function writer(type: number | null): MessageWriter {
  return new MessageWriter(type);
}

// ── Backend messages the proxy originates ─────────────────────────────────────────────

export type Severity = 'ERROR' | 'FATAL' | 'PANIC' | 'WARNING' | 'NOTICE' | 'INFO' | 'LOG' | 'DEBUG';

export interface ErrorFields {
  severity: Severity;
  code: string; // SQLSTATE
  message: string;
  detail?: string;
  hint?: string;
}

function noticeOrError(type: number, f: ErrorFields): Buffer {
  const w = writer(type);
  w.byte(0x53).cstring(f.severity); // S
  w.byte(0x56).cstring(f.severity); // V: non-localized severity
  w.byte(0x43).cstring(f.code); // C
  w.byte(0x4d).cstring(f.message); // M
  if (f.detail !== undefined) w.byte(0x44).cstring(f.detail); // D
  if (f.hint !== undefined) w.byte(0x48).cstring(f.hint); // H
  w.byte(0x52).cstring('heliosproxy'); // R: routine, so logs show who raised it
  return w.byte(0).done();
}

export function errorResponse(f: ErrorFields): Buffer {
  return noticeOrError(Msg.ErrorResponse, f);
}

export function noticeResponse(f: ErrorFields): Buffer {
  return noticeOrError(Msg.NoticeResponse, f);
}

const READY: Record<TxStatus, Buffer> = {
  I: Buffer.from([Msg.ReadyForQuery, 0, 0, 0, 5, 0x49]),
  T: Buffer.from([Msg.ReadyForQuery, 0, 0, 0, 5, 0x54]),
  E: Buffer.from([Msg.ReadyForQuery, 0, 0, 0, 5, 0x45]),
};
export type TxStatus = 'I' | 'T' | 'E';

export function readyForQuery(status: TxStatus): Buffer {
  return READY[status];
}

export const PARSE_COMPLETE = Buffer.from([Msg.ParseComplete, 0, 0, 0, 4]);
export const CLOSE_COMPLETE = Buffer.from([Msg.CloseComplete, 0, 0, 0, 4]);
export const SYNC = Buffer.from([Msg.Sync, 0, 0, 0, 4]);
export const FLUSH = Buffer.from([Msg.Flush, 0, 0, 0, 4]);
export const TERMINATE = Buffer.from([Msg.Terminate, 0, 0, 0, 4]);

export function authentication(code: AuthCode, payload?: Buffer): Buffer {
  const w = writer(Msg.Authentication).int32(code);
  if (payload !== undefined) w.bytes(payload);
  return w.done();
}

export function authenticationSASL(mechanisms: string[]): Buffer {
  const w = writer(Msg.Authentication).int32(AuthCode.SASL);
  for (const m of mechanisms) w.cstring(m);
  return w.byte(0).done();
}

export function parameterStatus(name: string, value: string): Buffer {
  return writer(Msg.ParameterStatus).cstring(name).cstring(value).done();
}

export function backendKeyData(pid: number, secret: number): Buffer {
  return writer(Msg.BackendKeyData).int32(pid).int32(secret).done();
}

export function negotiateProtocolVersion(minor: number, unsupported: string[]): Buffer {
  const w = writer(Msg.NegotiateProtocolVersion).int32(minor).int32(unsupported.length);
  for (const o of unsupported) w.cstring(o);
  return w.done();
}

// ── Frontend messages the proxy sends to servers ──────────────────────────────────────

export function startupMessage(params: Record<string, string>): Buffer {
  const w = writer(null).int32(PROTOCOL_3_0);
  for (const [k, v] of Object.entries(params)) w.cstring(k).cstring(v);
  return w.byte(0).done();
}

export function sslRequest(): Buffer {
  return writer(null).int32(SSL_REQUEST_CODE).done();
}

export function cancelRequest(pid: number, secret: number): Buffer {
  return writer(null).int32(CANCEL_REQUEST_CODE).int32(pid).int32(secret).done();
}

export function query(sql: string): Buffer {
  return writer(Msg.Query).cstring(sql).done();
}

export function passwordMessage(payload: Buffer | string): Buffer {
  const w = writer(Msg.PasswordMessage);
  return (typeof payload === 'string' ? w.cstring(payload) : w.bytes(payload)).done();
}

export function saslInitialResponse(mechanism: string, data: Buffer): Buffer {
  return writer(Msg.PasswordMessage).cstring(mechanism).int32(data.length).bytes(data).done();
}

export function parse(name: string, sql: string, paramTypes: number[] = []): Buffer {
  const w = writer(Msg.Parse).cstring(name).cstring(sql).int16(paramTypes.length);
  for (const t of paramTypes) w.int32(t);
  return w.done();
}

/** Bind with all parameters in text format; null entries are SQL NULL. */
export function bindText(portal: string, statement: string, params: (string | null)[]): Buffer {
  const w = writer(Msg.Bind).cstring(portal).cstring(statement).int16(0).int16(params.length);
  for (const p of params) {
    if (p === null) w.int32(-1);
    else {
      const b = Buffer.from(p, 'utf8');
      w.int32(b.length).bytes(b);
    }
  }
  return w.int16(0).done();
}

export function copyFail(message: string): Buffer {
  return writer(Msg.CopyFail).cstring(message).done();
}

export function describePortal(portal: string): Buffer {
  return writer(Msg.Describe).byte(0x50).cstring(portal).done();
}

export function execute(portal: string, maxRows = 0): Buffer {
  return writer(Msg.Execute).cstring(portal).int32(maxRows).done();
}

export function closeStatement(name: string): Buffer {
  return writer(Msg.Close).byte(0x53).cstring(name).done();
}

// ── Decoding ──────────────────────────────────────────────────────────────────────────

/** Reads a NUL-terminated string; returns it and the offset after the terminator (-1 when unterminated). */
export function readCString(buf: Buffer, offset: number, end: number): [string, number] {
  const nul = buf.indexOf(0, offset);
  if (nul < 0 || nul >= end) return ['', -1];
  return [buf.toString('utf8', offset, nul), nul + 1];
}

/** Decodes the fields of an ErrorResponse or NoticeResponse (whole message, type byte included). */
/** A DataRow's values as text (null for NULL): the proxy's own queries and the HTTP gateway ask for text. */
export function decodeDataRow(buf: Buffer, start: number, end: number): (string | null)[] {
  const n = buf.readInt16BE(start + 5);
  const row: (string | null)[] = [];
  let o = start + 7;
  for (let i = 0; i < n && o <= end; i++) {
    const len = buf.readInt32BE(o);
    o += 4;
    if (len < 0) row.push(null);
    else {
      row.push(buf.toString('utf8', o, o + len));
      o += len;
    }
  }
  return row;
}

export function decodeErrorFields(buf: Buffer, start: number, end: number): Map<string, string> {
  const fields = new Map<string, string>();
  let o = start + 5;
  while (o < end && buf[o] !== 0) {
    const code = String.fromCharCode(buf[o]!);
    const [value, next] = readCString(buf, o + 1, end);
    if (next < 0) break;
    fields.set(code, value);
    o = next;
  }
  return fields;
}

/** Decodes a StartupMessage body (after length and protocol code) into its key/value pairs. */
export function decodeStartupParams(msg: Buffer): Map<string, string> {
  const params = new Map<string, string>();
  let o = 8;
  while (o < msg.length && msg[o] !== 0) {
    const [k, n1] = readCString(msg, o, msg.length);
    if (n1 < 0) break;
    const [v, n2] = readCString(msg, n1, msg.length);
    if (n2 < 0) break;
    params.set(k, v);
    o = n2;
  }
  return params;
}

/** Quotes an identifier the way quote_ident does, always (safe for any schema name). */
export function quoteIdent(name: string): string {
  return '"' + name.replace(/"/g, '""') + '"';
}

/**
 * Quotes a literal so it means the same whatever standard_conforming_strings is on the server:
 * a client may have turned it off on a pooled connection, and the proxy splices these into SET statements.
 */
export function quoteLiteral(value: string): string {
  const quoted = value.replace(/'/g, "''");
  return value.includes('\\') ? "E'" + quoted.replace(/\\/g, '\\\\') + "'" : "'" + quoted + "'";
}
