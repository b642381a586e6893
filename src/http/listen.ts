// http/ owns the proxy's HTTP listeners. This file starts one, over plain HTTP or HTTPS with [tls]'s
// certificate (replaced in place on reload), shared by the SQL gateway and the admin API.
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { ServerTlsMaterial } from '../protocol/tls.js';

export type Handler = (req: IncomingMessage, res: ServerResponse) => void;

export interface HttpListener {
  server: Server;
  port: number;
  address: string;
  /** HTTPS listeners take a renewed certificate without restarting; no-op over plain HTTP. */
  setTls(material: ServerTlsMaterial): void;
  close(): Promise<void>;
}

export async function listenHttp(at: { host: string; port: number }, handler: Handler, tls: ServerTlsMaterial | null): Promise<HttpListener> {
  const https = tls !== null ? createHttpsServer({ cert: tls.cert, key: tls.key, minVersion: 'TLSv1.2' }, handler) : null;
  const server: Server = https ?? createHttpServer(handler);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(at.port, at.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address();
  const port = addr !== null && typeof addr === 'object' ? addr.port : at.port;
  const host = addr !== null && typeof addr === 'object' ? addr.address : at.host;
  return {
    server,
    port,
    address: `${host}:${port}`,
    setTls: (m) => https?.setSecureContext({ cert: m.cert, key: m.key, minVersion: 'TLSv1.2' }),
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
