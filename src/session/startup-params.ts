// session/ owns client sessions. This file decides which StartupMessage parameters a client may set and
// turns them into the GUCs the proxy keeps in line on whichever backend connection serves the client.
// The list is closed on purpose: `options=-c search_path=...` or `role` would walk around tenant isolation.

/** GUCs drivers commonly send at startup, lower-cased; each is applied with SET on the serving backend. */
export const TRACKED_PARAMETERS = new Set([
  'application_name',
  'client_encoding',
  'datestyle',
  'timezone',
  'intervalstyle',
  'extra_float_digits',
  'statement_timeout',
  'lock_timeout',
  'idle_in_transaction_session_timeout',
  'default_transaction_isolation',
  'default_transaction_read_only',
  'default_transaction_deferrable',
  'bytea_output',
]);

/** Parameters that describe the connection rather than set a GUC. */
const CONNECTION_PARAMETERS = new Set(['user', 'database']);

export class StartupParamError extends Error {}

/** Splits on unescaped whitespace; `\ ` is a space inside a word and `\\` a backslash (libpq's rules). */
function splitOptionWords(options: string): string[] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  for (let i = 0; i < options.length; i++) {
    const c = options[i]!;
    if (c === '\\' && i + 1 < options.length) {
      word += options[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
    } else {
      word += c;
      inWord = true;
    }
  }
  if (inWord) words.push(word);
  return words;
}

/** Splits libpq's `options` ("-c a=b -c c=d", "--a=b") into name/value pairs. */
function parseOptions(options: string): [string, string][] {
  const out: [string, string][] = [];
  const words = splitOptionWords(options);
  for (let i = 0; i < words.length; i++) {
    let w = words[i]!;
    if (w === '-c') w = words[++i] ?? '';
    else if (w.startsWith('-c')) w = w.slice(2);
    else if (w.startsWith('--')) w = w.slice(2);
    else throw new StartupParamError(`unsupported option in "options": ${w}`);
    const eq = w.indexOf('=');
    if (eq <= 0) throw new StartupParamError(`malformed option in "options": ${w}`);
    out.push([w.slice(0, eq).replace(/-/g, '_'), w.slice(eq + 1)]);
  }
  return out;
}

/** Returns the GUCs to keep in line for this client, or throws naming the parameter it cannot allow. */
export function sessionParameters(params: Map<string, string>): Map<string, string> {
  const desired = new Map<string, string>();
  const accept = (name: string, value: string): void => {
    const key = name.toLowerCase();
    if (!TRACKED_PARAMETERS.has(key)) throw new StartupParamError(`unsupported startup parameter: ${name}`);
    desired.set(key, value);
  };
  for (const [name, value] of params) {
    if (CONNECTION_PARAMETERS.has(name) || name.startsWith('_pq_.')) continue;
    if (name === 'replication') throw new StartupParamError('replication connections are not supported through the proxy');
    if (name === 'options') {
      for (const [k, v] of parseOptions(value)) accept(k, v);
      continue;
    }
    accept(name, value);
  }
  return desired;
}
