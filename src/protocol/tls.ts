// protocol/ owns the bytes on the wire. This file owns TLS around them: the certificate the proxy presents
// to clients after answering SSLRequest with 'S' (and to HTTPS clients of the gateway and admin API), and
// the options for upgrading a backend connection after PostgreSQL answers the proxy's own SSLRequest.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { createSecureContext, type ConnectionOptions, type SecureContext } from 'node:tls';
import type { Config } from '../config/schema.js';

type ClientTls = NonNullable<Config['tls']>;
type BackendTls = NonNullable<Config['backend_tls']>;

function read(baseDir: string, file: string, key: string): Buffer {
  const path = resolve(baseDir, file);
  try {
    return readFileSync(path);
  } catch (err) {
    throw new Error(`${key}: cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
  }
}

export interface ServerTlsMaterial {
  context: SecureContext;
  cert: Buffer;
  key: Buffer;
}

/** Reads cert_file and key_file (again on every reload, so a renewed certificate is picked up). */
export function serverTlsContext(tls: ClientTls, baseDir: string): ServerTlsMaterial {
  const cert = read(baseDir, tls.cert_file!, 'cert_file');
  const key = read(baseDir, tls.key_file!, 'key_file');
  try {
    return { context: createSecureContext({ cert, key, minVersion: 'TLSv1.2' }), cert, key };
  } catch (err) {
    throw new Error(`cert_file/key_file do not form a usable certificate and key: ${(err as Error).message}`);
  }
}

export interface BackendTlsPolicy {
  /** Send SSLRequest at all. */
  request: boolean;
  /** A backend answering 'N' is an error (require, verify-full) rather than a plaintext fallback (prefer). */
  required: boolean;
  options: ConnectionOptions;
}

/** What [backend_tls] asks of every backend login. */
export function backendTlsOptions(tls: BackendTls | undefined, baseDir: string): BackendTlsPolicy {
  const mode = tls?.mode ?? 'disable';
  const ca = tls?.ca_file !== undefined ? read(baseDir, tls.ca_file, 'ca_file') : undefined;
  const verify = mode === 'verify-full';
  return {
    request: mode !== 'disable',
    required: mode === 'require' || verify,
    // require/prefer encrypt without checking who answers, as libpq's sslmode of the same name.
    options: { ...(ca !== undefined ? { ca } : {}), rejectUnauthorized: verify, ...(verify ? {} : { checkServerIdentity: () => undefined }) },
  };
}

/** Cleartext secrets (passwords in passthrough mode, JWTs, API keys) are accepted only over TLS or from loopback. */
export function isLoopback(addr: string | undefined): boolean {
  return addr !== undefined && (addr === '::1' || addr.startsWith('127.') || addr.startsWith('::ffff:127.'));
}
