// auth/ owns who a client is and how the proxy proves itself to PostgreSQL. This file is SCRAM-SHA-256
// (RFC 5802/7677 as PostgreSQL uses it) on both sides. The proxy never needs a plaintext password when it
// holds a verifier: a client's proof yields its ClientKey, and ClientKey + ServerKey are all a backend login needs.
import { createHash, createHmac, pbkdf2, randomBytes, timingSafeEqual } from 'node:crypto';
import { promisify } from 'node:util';

const pbkdf2Async = promisify(pbkdf2);

export interface ScramKeys {
  iterations: number;
  salt: Buffer;
  storedKey: Buffer;
  serverKey: Buffer;
  /** Known only after a client proved it knows the password (or a plaintext was given). */
  clientKey?: Buffer;
}

const hmac = (key: Buffer, data: string | Buffer): Buffer => createHmac('sha256', key).update(data).digest();
const sha256 = (data: Buffer): Buffer => createHash('sha256').update(data).digest();

function xor(a: Buffer, b: Buffer): Buffer {
  const out = Buffer.allocUnsafe(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i]! ^ b[i]!;
  return out;
}

/** Parses a pg_authid-style verifier: SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>. */
export function parseScramVerifier(v: string): ScramKeys | null {
  const m = /^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$/.exec(v);
  if (m === null) return null;
  const storedKey = Buffer.from(m[3]!, 'base64');
  const serverKey = Buffer.from(m[4]!, 'base64');
  if (storedKey.length !== 32 || serverKey.length !== 32) return null;
  return { iterations: Number(m[1]), salt: Buffer.from(m[2]!, 'base64'), storedKey, serverKey };
}

/** Derives full keys (ClientKey included) from a plaintext password; async so logins don't block the loop. */
export async function deriveScramKeys(password: string, salt: Buffer, iterations: number): Promise<Required<ScramKeys>> {
  // SASLprep is skipped: like libpq, treat the password as raw UTF-8 when it is plain ASCII, which is the common case.
  const salted = await pbkdf2Async(Buffer.from(password, 'utf8'), salt, iterations, 32, 'sha256');
  const clientKey = hmac(salted, 'Client Key');
  return { iterations, salt, clientKey, storedKey: sha256(clientKey), serverKey: hmac(salted, 'Server Key') };
}

export class ScramError extends Error {}

function attrs(s: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of s.split(',')) {
    const eq = part.indexOf('=');
    if (eq === 1) out.set(part[0]!, part.slice(2));
  }
  return out;
}

/** The proxy as SCRAM server, checking a client's proof against a verifier. */
export class ScramServerExchange {
  private clientFirstBare = '';
  private serverFirst = '';
  private nonce = '';
  private gs2Header = '';

  constructor(private readonly keys: ScramKeys) {}

  /** Consumes SASLInitialResponse data; returns the server-first-message. */
  clientFirst(data: Buffer): Buffer {
    const msg = data.toString('utf8');
    // gs2-header: "n,," (no channel binding) or "y,," (client could bind but thinks we can't). "p=" needs TLS.
    const m = /^([ny]),(a=[^,]*)?,(.*)$/.exec(msg);
    if (m === null) throw new ScramError('malformed SCRAM client-first-message (channel binding is not supported)');
    this.gs2Header = msg.slice(0, msg.length - m[3]!.length);
    this.clientFirstBare = m[3]!;
    const clientNonce = attrs(this.clientFirstBare).get('r');
    if (clientNonce === undefined || clientNonce === '') throw new ScramError('SCRAM client nonce missing');
    this.nonce = clientNonce + randomBytes(18).toString('base64');
    this.serverFirst = `r=${this.nonce},s=${this.keys.salt.toString('base64')},i=${this.keys.iterations}`;
    return Buffer.from(this.serverFirst, 'utf8');
  }

  /** Consumes SASLResponse data; returns server-final-message and the client's ClientKey, or null on a bad proof. */
  clientFinal(data: Buffer): { serverFinal: Buffer; clientKey: Buffer } | null {
    const msg = data.toString('utf8');
    const pIdx = msg.lastIndexOf(',p=');
    if (pIdx < 0) throw new ScramError('malformed SCRAM client-final-message');
    const withoutProof = msg.slice(0, pIdx);
    const a = attrs(withoutProof);
    if (a.get('r') !== this.nonce) throw new ScramError('SCRAM nonce mismatch');
    if (a.get('c') !== Buffer.from(this.gs2Header, 'utf8').toString('base64')) throw new ScramError('SCRAM channel binding mismatch');
    const proof = Buffer.from(msg.slice(pIdx + 3), 'base64');
    if (proof.length !== 32) return null;
    const authMessage = `${this.clientFirstBare},${this.serverFirst},${withoutProof}`;
    const clientKey = xor(proof, hmac(this.keys.storedKey, authMessage));
    if (!timingSafeEqual(sha256(clientKey), this.keys.storedKey)) return null;
    const serverFinal = Buffer.from('v=' + hmac(this.keys.serverKey, authMessage).toString('base64'), 'utf8');
    return { serverFinal, clientKey };
  }
}

/** The proxy as SCRAM client of a backend, from a password or from ClientKey + ServerKey. */
export class ScramClientExchange {
  private readonly clientNonce = randomBytes(18).toString('base64');
  private clientFirstBare = '';
  private authMessage = '';
  private serverKey: Buffer | null = null;
  /** Keys derived from a plaintext password during this exchange (lets the proxy verify later logins locally). */
  derived: Required<ScramKeys> | null = null;

  constructor(private readonly secret: { password: string } | { keys: ScramKeys }) {}

  clientFirst(): Buffer {
    // PostgreSQL takes the user from the StartupMessage and ignores n=.
    this.clientFirstBare = `n=,r=${this.clientNonce}`;
    return Buffer.from('n,,' + this.clientFirstBare, 'utf8');
  }

  async clientFinal(serverFirstData: Buffer): Promise<Buffer> {
    const serverFirst = serverFirstData.toString('utf8');
    const a = attrs(serverFirst);
    const nonce = a.get('r');
    const salt = a.get('s');
    const iterations = Number(a.get('i'));
    if (nonce === undefined || !nonce.startsWith(this.clientNonce) || salt === undefined || !(iterations > 0)) {
      throw new ScramError('malformed SCRAM server-first-message');
    }
    let clientKey: Buffer;
    if ('password' in this.secret) {
      const keys = await cachedDerive(this.secret.password, Buffer.from(salt, 'base64'), iterations);
      clientKey = keys.clientKey;
      this.serverKey = keys.serverKey;
      this.derived = keys;
    } else {
      const k = this.secret.keys;
      if (k.clientKey === undefined) throw new ScramError('no SCRAM ClientKey known for this role yet');
      if (k.salt.toString('base64') !== salt || k.iterations !== iterations) {
        throw new ScramError('the backend SCRAM verifier differs from the one the proxy holds (password changed?)');
      }
      clientKey = k.clientKey;
      this.serverKey = k.serverKey;
    }
    const withoutProof = `c=biws,r=${nonce}`;
    this.authMessage = `${this.clientFirstBare},${serverFirst},${withoutProof}`;
    const proof = xor(clientKey, hmac(sha256(clientKey), this.authMessage));
    return Buffer.from(`${withoutProof},p=${proof.toString('base64')}`, 'utf8');
  }

  verifyServerFinal(data: Buffer): boolean {
    const v = attrs(data.toString('utf8')).get('v');
    if (v === undefined || this.serverKey === null) return false;
    const expected = hmac(this.serverKey, this.authMessage);
    const got = Buffer.from(v, 'base64');
    return got.length === expected.length && timingSafeEqual(got, expected);
  }
}

// Salted keys are expensive (4096 PBKDF2 rounds); backends reuse one salt per role, so cache by
// (salt, iterations, password digest). The digest is keyed by a per-process random key so the cache
// never holds anything that is useful outside this process.
const processKey = randomBytes(32);
const deriveCache = new Map<string, Required<ScramKeys>>();

export async function cachedDerive(password: string, salt: Buffer, iterations: number): Promise<Required<ScramKeys>> {
  const key = `${iterations}:${salt.toString('base64')}:${hmac(processKey, password).toString('base64')}`;
  const hit = deriveCache.get(key);
  if (hit !== undefined) return hit;
  const keys = await deriveScramKeys(password, salt, iterations);
  if (deriveCache.size > 10000) deriveCache.clear();
  deriveCache.set(key, keys);
  return keys;
}

/**
 * A verifier for a role the proxy does not know, so unknown roles fail exactly like wrong passwords. The
 * salt is stable per role name (as PostgreSQL's scram_mock_salt): a salt that changed on every attempt
 * would tell an unknown role from a known one.
 */
export function mockScramKeys(role: string): ScramKeys {
  return { iterations: 4096, salt: hmac(processKey, 'mock-salt:' + role).subarray(0, 16), storedKey: randomBytes(32), serverKey: randomBytes(32) };
}
