// auth/ owns credentials. This file reads PgBouncer's userlist.txt format so an existing auth_file works
// unchanged: one `"role" "secret"` per line, `""` escapes a quote, lines starting with ';' or '#' are comments.

export function parseUserlist(text: string, source: string): Map<string, string> {
  const out = new Map<string, string>();
  const lines = text.split(/\r?\n/);
  lines.forEach((line, i) => {
    const t = line.trim();
    if (t === '' || t.startsWith(';') || t.startsWith('#')) return;
    const fields: string[] = [];
    let o = 0;
    while (o < t.length) {
      while (t[o] === ' ' || t[o] === '\t') o++;
      if (o >= t.length) break;
      if (t[o] !== '"') throw new Error(`${source}:${i + 1}: expected a double-quoted field`);
      let value = '';
      o++;
      for (;;) {
        if (o >= t.length) throw new Error(`${source}:${i + 1}: unterminated quoted field`);
        if (t[o] === '"') {
          if (t[o + 1] === '"') {
            value += '"';
            o += 2;
            continue;
          }
          o++;
          break;
        }
        value += t[o++];
      }
      fields.push(value);
    }
    if (fields.length < 2) throw new Error(`${source}:${i + 1}: expected "role" "secret"`);
    out.set(fields[0]!, fields[1]!);
  });
  return out;
}
