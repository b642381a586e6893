// policy/ owns what a tenant's SQL may do. This file caches classifications by SQL text. Simple-protocol
// clients send a new text for every literal value, so the main key replaces literals with '?': it is used
// only for statements whose facts provably do not depend on literal values, and the scanner that builds it
// gives up (no key) on anything it is not certain about — escape strings, dollar quotes, backslashes.
// The key is built from the message's bytes, so a hit never decodes the text or builds a string: this
// lookup runs for every statement a tenant with guardrails sends.
import { classify, ParseFailure, type StatementFacts } from './classify.js';

export type Classification = StatementFacts[] | ParseFailure;

/** One normalised text and its facts; entries whose keys share a hash are chained. */
interface KeyedFacts {
  key: Buffer;
  facts: StatementFacts[];
  next: KeyedFacts | null;
}

const SCRATCH_KEPT = 64 * 1024;

export class FactsCache {
  /** Texts with no literal-free key, or whose facts depend on literals: cached by their exact text. */
  private readonly exact = new Map<string, Classification>();
  /** Hash of the literal-free key → entries. */
  private readonly normalized = new Map<number, KeyedFacts>();
  private normalizedCount = 0;
  /**
   * The entry of the last hit. A text with no literals is its own key (normalising a key changes nothing:
   * ? and '?' stay as they are), so a repeat of it (an extended-protocol Parse, mostly) is found without
   * building the key.
   */
  private lastHit: KeyedFacts | null = null;
  /** Where keys are built; reused, so a lookup allocates nothing. */
  private scratch = Buffer.allocUnsafeSlow(4096);

  constructor(private readonly maxEntries = 10_000) {}

  get size(): number {
    return this.exact.size + this.normalizedCount;
  }

  lookup(sql: string): Classification {
    const bytes = Buffer.from(sql, 'utf8');
    return this.lookupText(bytes, 0, bytes.length, sql);
  }

  /** Facts for the UTF-8 SQL text in buf[start, end). `sql` is that text when the caller already has it. */
  lookupText(buf: Buffer, start: number, end: number, sql: string | null = null): Classification {
    const last = this.lastHit;
    if (last !== null && last.key.length === end - start && sameBytesAt(buf, start, last.key)) return last.facts;
    if (this.scratch.length < 2 * (end - start) + 2) this.scratch = Buffer.allocUnsafeSlow(2 * (end - start) + 2);
    const scratch = this.scratch;
    const keyLength = normalizeInto(buf, start, end, scratch);
    let hash = 0;
    if (keyLength >= 0) {
      hash = hashBytes(scratch, keyLength);
      for (let e = this.normalized.get(hash) ?? null; e !== null; e = e.next) {
        if (e.key.length === keyLength && sameBytesAt(scratch, 0, e.key)) {
          this.lastHit = e;
          return e.facts;
        }
      }
    }
    // A very long text grew the scratch buffer: let it go rather than hold megabytes for good.
    if (this.scratch.length > SCRATCH_KEPT) this.scratch = Buffer.allocUnsafeSlow(SCRATCH_KEPT);
    const text = sql ?? buf.toString('utf8', start, end);
    const hit = this.exact.get(text);
    if (hit !== undefined) return hit;
    let result: Classification;
    try {
      result = classify(text);
    } catch (err) {
      result = err instanceof ParseFailure ? err : new ParseFailure(String(err));
    }
    if (keyLength >= 0 && !(result instanceof ParseFailure) && !result.some((f) => f.literalsMatter)) {
      // Its own memory: a slice of Node's shared pool would keep a whole 8 KiB slab alive per key.
      const key = Buffer.allocUnsafeSlow(keyLength);
      scratch.copy(key, 0, 0, keyLength);
      this.rememberNormalized(hash, key, result);
    } else {
      if (this.exact.size >= this.maxEntries) dropOldestTenth(this.exact, this.maxEntries);
      this.exact.set(text, result);
    }
    return result;
  }

  private rememberNormalized(hash: number, key: Buffer, facts: StatementFacts[]): void {
    if (this.normalizedCount >= this.maxEntries) {
      // Drop the oldest tenth (Map keeps insertion order): cheaper than true LRU bookkeeping on every hit.
      let drop = Math.ceil(this.maxEntries / 10);
      for (const [h, e] of this.normalized) {
        this.normalized.delete(h);
        for (let x: KeyedFacts | null = e; x !== null; x = x.next) this.normalizedCount--;
        if (--drop <= 0) break;
      }
    }
    const entry: KeyedFacts = { key, facts, next: this.normalized.get(hash) ?? null };
    this.normalized.set(hash, entry);
    this.normalizedCount++;
    this.lastHit = entry;
  }
}

function dropOldestTenth<K, V>(map: Map<K, V>, maxEntries: number): void {
  let drop = Math.ceil(maxEntries / 10);
  for (const k of map.keys()) {
    map.delete(k);
    if (--drop === 0) break;
  }
}

/** Whether a[from, from + key.length) is `key`. Keys are short: a loop beats Buffer.compare's checks and native call. */
function sameBytesAt(a: Buffer, from: number, key: Buffer): boolean {
  for (let i = 0; i < key.length; i++) if (a[from + i] !== key[i]) return false;
  return true;
}

/** FNV-1a over the key's bytes. */
function hashBytes(b: Buffer, n: number): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < n; i++) h = Math.imul(h ^ b[i]!, 0x01000193);
  return h >>> 0;
}

const isDigit = (c: number): boolean => c >= 48 && c <= 57;
// Every byte of a multi-byte UTF-8 character is ≥ 128, and PostgreSQL takes those as identifier characters.
const isIdentStart = (c: number): boolean => (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c === 95 || c >= 128;
const isIdentChar = (c: number): boolean => isIdentStart(c) || isDigit(c) || c === 36;

/**
 * Writes the text in buf[start, end) into `out` with plain string and numeric literals replaced by '?',
 * and returns the key's length; -1 when the text holds anything whose lexing is not certain here (E'',
 * U&'', B'', X'', N'' prefixes, dollar quotes, backslashes), so such statements are only ever cached by
 * their exact text. `out` must hold 2 × (end − start) + 2 bytes ('' becomes '?').
 */
function normalizeInto(buf: Buffer, start: number, end: number, out: Buffer): number {
  let o = 0;
  let i = start;
  const at = (k: number): number => (k < end ? buf[k]! : -1);
  while (i < end) {
    const c = buf[i]!;
    if (c === 92 /* \ */) return -1;
    if (c === 45 /* - */ && at(i + 1) === 45) {
      // PostgreSQL's lexer ends a line comment at \n or \r: stopping at \n only would take what follows
      // a \r for comment here and for SQL there, and a "literal" in it for one.
      while (i < end && buf[i] !== 10 && buf[i] !== 13) out[o++] = buf[i++]!;
      continue;
    }
    if (c === 47 /* / */ && at(i + 1) === 42) {
      let depth = 1;
      out[o++] = 47;
      out[o++] = 42;
      i += 2;
      while (i < end && depth > 0) {
        if (buf[i] === 47 && at(i + 1) === 42) depth++;
        else if (buf[i] === 42 && at(i + 1) === 47) depth--;
        else {
          out[o++] = buf[i++]!;
          continue;
        }
        out[o++] = buf[i++]!;
        out[o++] = buf[i++]!;
      }
      if (depth > 0) return -1;
      continue;
    }
    if (c === 34 /* " */) {
      // A quoted name, "" inside it included, is copied as it is.
      out[o++] = buf[i++]!;
      for (;;) {
        if (i >= end) return -1;
        const q = buf[i]!;
        out[o++] = q;
        i++;
        if (q === 34) {
          if (at(i) !== 34) break;
          out[o++] = 34;
          i++;
        }
      }
      continue;
    }
    if (c === 36 /* $ */) {
      if (!isDigit(at(i + 1))) return -1; // dollar quote
      out[o++] = buf[i++]!;
      while (isDigit(at(i))) out[o++] = buf[i++]!;
      continue;
    }
    if (isIdentStart(c)) {
      while (i < end && isIdentChar(buf[i]!)) out[o++] = buf[i++]!;
      // A prefix glued to a quote is a special string form (E'…', B'…', U&'…', N'…'); U&"…" is an
      // identifier whose UESCAPE '…' literal changes what it names.
      if (at(i) === 39 || (at(i) === 38 && (at(i + 1) === 39 || at(i + 1) === 34))) return -1;
      continue;
    }
    if (c === 39 /* ' */) {
      let j = i + 1;
      for (;;) {
        if (j >= end) return -1;
        if (buf[j] === 39) {
          if (at(j + 1) !== 39) break;
          j += 2;
        } else j++;
      }
      out[o++] = 39;
      out[o++] = 63;
      out[o++] = 39;
      i = j + 1;
      continue;
    }
    if (isDigit(c) || (c === 46 && isDigit(at(i + 1)))) {
      let j = i;
      while (j < end && (isDigit(buf[j]!) || buf[j] === 46)) j++;
      if (at(j) === 101 || at(j) === 69) {
        // exponent: 1e10, 1.5E-3
        let k = j + 1;
        if (at(k) === 43 || at(k) === 45) k++;
        if (isDigit(at(k))) {
          j = k;
          while (isDigit(at(j))) j++;
        }
      }
      if (isIdentStart(at(j))) return -1; // 1abc: not a plain number
      out[o++] = 63;
      i = j;
      continue;
    }
    out[o++] = c;
    i++;
  }
  return o;
}

/** The literal-free key of a SQL text (as a string, for tests and logs), or null when there is none. */
export function normalizeLiterals(sql: string): string | null {
  const bytes = Buffer.from(sql, 'utf8');
  const out = Buffer.allocUnsafe(2 * bytes.length + 2);
  const n = normalizeInto(bytes, 0, bytes.length, out);
  return n < 0 ? null : out.toString('utf8', 0, n);
}
