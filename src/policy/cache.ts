// policy/ owns what a tenant's SQL may do. This file caches classifications by SQL text. Simple-protocol
// clients send a new text for every literal value, so a second key replaces literals with '?': it is used
// only for statements whose facts provably do not depend on literal values, and the scanner that builds it
// gives up (no key) on anything it is not certain about — escape strings, dollar quotes, backslashes.
import { classify, ParseFailure, type StatementFacts } from './classify.js';

export type Classification = StatementFacts[] | ParseFailure;

export class FactsCache {
  private readonly exact = new Map<string, Classification>();
  private readonly normalized = new Map<string, StatementFacts[]>();

  constructor(private readonly maxEntries = 10_000) {}

  get size(): number {
    return this.exact.size + this.normalized.size;
  }

  lookup(sql: string): Classification {
    const hit = this.exact.get(sql);
    if (hit !== undefined) return hit;
    const key = normalizeLiterals(sql);
    if (key !== null) {
      const n = this.normalized.get(key);
      if (n !== undefined) return n;
    }
    let result: Classification;
    try {
      result = classify(sql);
    } catch (err) {
      result = err instanceof ParseFailure ? err : new ParseFailure(String(err));
    }
    this.remember(this.exact, sql, result);
    if (key !== null && !(result instanceof ParseFailure) && !result.some((f) => f.literalsMatter)) {
      this.remember(this.normalized, key, result);
    }
    return result;
  }

  private remember<V>(map: Map<string, V>, key: string, value: V): void {
    if (map.size >= this.maxEntries) {
      // Drop the oldest tenth: cheaper than true LRU bookkeeping on every hit.
      let drop = Math.ceil(this.maxEntries / 10);
      for (const k of map.keys()) {
        map.delete(k);
        if (--drop === 0) break;
      }
    }
    map.set(key, value);
  }
}

const isDigit = (c: number): boolean => c >= 48 && c <= 57;
const isIdentStart = (c: number): boolean => (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c === 95 || c >= 128;
const isIdentChar = (c: number): boolean => isIdentStart(c) || isDigit(c) || c === 36;

/**
 * Replaces plain string and numeric literals with '?'. Returns null when the text holds anything whose
 * lexing is not certain here (E'', U&'', B'', X'', N'' prefixes, dollar quotes, backslashes), so such
 * statements are only ever cached by their exact text.
 */
export function normalizeLiterals(sql: string): string | null {
  let out = '';
  let i = 0;
  let from = 0;
  let changed = false;
  const n = sql.length;
  while (i < n) {
    const c = sql.charCodeAt(i);
    if (c === 92 /* \ */) return null;
    if (c === 45 /* - */ && sql.charCodeAt(i + 1) === 45) {
      const nl = sql.indexOf('\n', i);
      i = nl < 0 ? n : nl + 1;
      continue;
    }
    if (c === 47 /* / */ && sql.charCodeAt(i + 1) === 42) {
      let depth = 1;
      i += 2;
      while (i < n && depth > 0) {
        if (sql.charCodeAt(i) === 47 && sql.charCodeAt(i + 1) === 42) {
          depth++;
          i += 2;
        } else if (sql.charCodeAt(i) === 42 && sql.charCodeAt(i + 1) === 47) {
          depth--;
          i += 2;
        } else i++;
      }
      if (depth > 0) return null;
      continue;
    }
    if (c === 34 /* " */) {
      const end = sql.indexOf('"', i + 1);
      if (end < 0) return null;
      i = end + 1;
      while (sql.charCodeAt(i) === 34) {
        const e2 = sql.indexOf('"', i + 1);
        if (e2 < 0) return null;
        i = e2 + 1;
      }
      continue;
    }
    if (c === 36 /* $ */) {
      if (!isDigit(sql.charCodeAt(i + 1))) return null; // dollar quote
      i++;
      while (isDigit(sql.charCodeAt(i))) i++;
      continue;
    }
    if (isIdentStart(c)) {
      while (i < n && isIdentChar(sql.charCodeAt(i))) i++;
      // A prefix glued to a quote is a special string form (E'…', B'…', U&'…', N'…').
      if (sql.charCodeAt(i) === 39 || (sql.charCodeAt(i) === 38 && sql.charCodeAt(i + 1) === 39)) return null;
      continue;
    }
    if (c === 39 /* ' */) {
      let j = i + 1;
      for (;;) {
        const e = sql.indexOf("'", j);
        if (e < 0) return null;
        if (sql.charCodeAt(e + 1) === 39) {
          j = e + 2;
          continue;
        }
        j = e + 1;
        break;
      }
      out += sql.slice(from, i) + "'?'";
      from = i = j;
      changed = true;
      continue;
    }
    if (isDigit(c) || (c === 46 && isDigit(sql.charCodeAt(i + 1)))) {
      let j = i;
      while (j < n && (isDigit(sql.charCodeAt(j)) || sql.charCodeAt(j) === 46)) j++;
      if (sql.charCodeAt(j) === 101 || sql.charCodeAt(j) === 69) {
        // exponent: 1e10, 1.5E-3
        let k = j + 1;
        if (sql.charCodeAt(k) === 43 || sql.charCodeAt(k) === 45) k++;
        if (isDigit(sql.charCodeAt(k))) {
          j = k;
          while (isDigit(sql.charCodeAt(j))) j++;
        }
      }
      if (isIdentStart(sql.charCodeAt(j))) return null; // 1abc: not a plain number
      out += sql.slice(from, i) + '?';
      from = i = j;
      changed = true;
      continue;
    }
    i++;
  }
  return changed ? out + sql.slice(from) : sql;
}
