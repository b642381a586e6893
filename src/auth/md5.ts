// auth/ owns client and backend authentication. This file is PostgreSQL's md5 scheme:
// "md5" + md5(md5(password + role) + salt). The proxy only ever needs the inner hash, never the password.
import { createHash, timingSafeEqual } from 'node:crypto';

const md5hex = (data: string | Buffer): string => createHash('md5').update(data).digest('hex');

/** The stored form: "md5" + md5(password + role), as in pg_authid and PgBouncer's userlist. */
export function md5Secret(password: string, role: string): string {
  return 'md5' + md5hex(password + role);
}

/** The PasswordMessage payload answering AuthenticationMD5Password, from the stored form. */
export function md5Response(storedMd5: string, salt: Buffer): string {
  return 'md5' + md5hex(Buffer.concat([Buffer.from(storedMd5.slice(3), 'utf8'), salt]));
}

export function md5Matches(storedMd5: string, salt: Buffer, response: string): boolean {
  const expected = Buffer.from(md5Response(storedMd5, salt));
  const got = Buffer.from(response);
  return expected.length === got.length && timingSafeEqual(expected, got);
}

export function isMd5Secret(s: string): boolean {
  return /^md5[0-9a-f]{32}$/.test(s);
}
