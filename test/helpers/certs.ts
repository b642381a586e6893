// Certificates and keys made with openssl at run time (nothing secret is committed): a CA, a server
// certificate for localhost/127.0.0.1 signed by it, and key pairs for JWT signing.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from '../../src/localpg/proc.js';

export interface TestCerts {
  dir: string;
  caFile: string;
  certFile: string;
  keyFile: string;
  /** A second certificate for the same names (reload tests), signed by the same CA. */
  cert2File: string;
  key2File: string;
  ca: Buffer;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  const r = await run('openssl', args, { cwd });
  if (r.code !== 0) throw new Error(`openssl ${args[0]} failed: ${r.stderr.trim()}`);
}

let made: Promise<TestCerts> | null = null;

export function testCerts(): Promise<TestCerts> {
  made ??= (async () => {
    const dir = mkdtempSync(join(tmpdir(), 'helios-certs-'));
    // One set per test file (process); nothing of it should outlive the run.
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
    await openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=HeliosProxy test CA'], dir);
    writeFileSync(join(dir, 'san.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n');
    for (const name of ['server', 'server2']) {
      await openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', '/CN=localhost'], dir);
      await openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${name}.crt`, '-days', '2', '-extfile', 'san.ext'], dir);
    }
    return {
      dir,
      caFile: join(dir, 'ca.crt'),
      certFile: join(dir, 'server.crt'),
      keyFile: join(dir, 'server.key'),
      cert2File: join(dir, 'server2.crt'),
      key2File: join(dir, 'server2.key'),
      ca: readFileSync(join(dir, 'ca.crt')),
    };
  })();
  return made;
}
