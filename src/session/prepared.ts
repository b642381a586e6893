// session/ owns client sessions. This file reads and rewrites the statement names in Parse, Bind, Describe
// and Close, which is how named prepared statements survive transaction pooling: the client's names map to
// proxy names derived from (tenant, SQL, parameter types), so any backend that already prepared the same
// statement for the same tenant can serve it, and one that has not gets a Parse injected first.
import { createHash } from 'node:crypto';

export interface TrackedStatement {
  /** Name on the backend. */
  serverName: string;
  /** A ready-to-send Parse message carrying serverName. */
  parse: Buffer;
}

/** Offsets of the NUL-terminated name that starts at `from`; -1 when malformed. */
function nameEnd(buf: Buffer, from: number, end: number): number {
  const nul = buf.indexOf(0, from);
  return nul < 0 || nul >= end ? -1 : nul;
}

/** Parse: returns the statement name's [start, end) and the rest (query, types) offset. */
export function parseNameSpan(buf: Buffer, start: number, end: number): [number, number] | null {
  const e = nameEnd(buf, start + 5, end);
  return e < 0 ? null : [start + 5, e];
}

/** Bind: portal name then statement name. */
export function bindStatementSpan(buf: Buffer, start: number, end: number): [number, number] | null {
  const portalEnd = nameEnd(buf, start + 5, end);
  if (portalEnd < 0) return null;
  const e = nameEnd(buf, portalEnd + 1, end);
  return e < 0 ? null : [portalEnd + 1, e];
}

/** Describe / Close: a kind byte ('S' statement or 'P' portal) then the name. */
export function targetSpan(buf: Buffer, start: number, end: number): [number, number] | null {
  const e = nameEnd(buf, start + 6, end);
  return e < 0 ? null : [start + 6, e];
}

/** Copies a message with the name at [nameStart, nameEnd) replaced. */
export function renameIn(buf: Buffer, start: number, end: number, nameStart: number, nameEnd_: number, name: string): Buffer {
  const nameLen = Buffer.byteLength(name);
  const out = Buffer.allocUnsafe(end - start - (nameEnd_ - nameStart) + nameLen);
  buf.copy(out, 0, start, nameStart);
  out.write(name, nameStart - start, 'utf8');
  buf.copy(out, nameStart - start + nameLen, nameEnd_, end);
  out.writeInt32BE(out.length - 1, 1);
  return out;
}

/** A backend statement name unique to (owner, query text + parameter types). */
export function serverStatementName(owner: string, buf: Buffer, bodyStart: number, end: number): string {
  return 'hp_' + createHash('sha1').update(owner).update('\0').update(buf.subarray(bodyStart, end)).digest('hex').slice(0, 28);
}

export function isStatementTarget(buf: Buffer, start: number): boolean {
  return buf[start + 5] === 0x53; // 'S'
}

