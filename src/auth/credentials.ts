// auth/ owns credentials: where a role's secret comes from (auth_file, auth_query, or learned from a client
// whose cleartext password the backend accepted) and which form of it a backend login can use.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import type { Config } from '../config/schema.js';
import { isMd5Secret } from './md5.js';
import { cachedDerive, parseScramVerifier, type ScramKeys } from './scram.js';
import { parseUserlist } from './userlist.js';

/** How long a password verified by the backend (zero-config mode) is trusted before the backend is asked again. */
const LEARNED_TTL_MS = 60_000;

export type Secret =
  | { kind: 'plain'; password: string }
  | { kind: 'md5'; hash: string }
  | { kind: 'scram'; keys: ScramKeys };

export function secretFromStored(stored: string): Secret {
  const scram = parseScramVerifier(stored);
  if (scram !== null) return { kind: 'scram', keys: scram };
  if (isMd5Secret(stored)) return { kind: 'md5', hash: stored };
  return { kind: 'plain', password: stored };
}

/** Runs auth_query for one role; resolves to the stored secret or null when the role may not log in. */
export type AuthQueryRunner = (role: string) => Promise<string | null>;

export class CredentialStore {
  private fileSecrets = new Map<string, string>();
  /** Secrets usable for backend logins, refined as clients log in (a SCRAM proof yields the ClientKey). */
  private backendSecrets = new Map<string, Secret>();
  private authQuery: AuthQueryRunner | null = null;
  private learnedAt = new Map<string, number>();

  constructor(
    private auth: Config['auth'],
    baseDir: string,
  ) {
    this.reloadFile(auth, baseDir);
  }

  /** (Re-)reads auth_file; secrets learned from logins are kept. */
  reloadFile(auth: Config['auth'], baseDir: string): void {
    this.auth = auth;
    if (auth?.auth_file !== undefined) {
      const path = resolve(baseDir, auth.auth_file);
      this.fileSecrets = parseUserlist(readFileSync(path, 'utf8'), path);
    } else this.fileSecrets = new Map();
  }

  /** With no [auth] section the proxy asks for a cleartext password and lets the backend judge it. */
  get passthrough(): boolean {
    return this.auth === undefined;
  }

  get authType(): 'scram-sha-256' | 'md5' {
    return this.auth?.auth_type ?? 'scram-sha-256';
  }

  get authUser(): string | undefined {
    return this.auth?.auth_user;
  }

  setAuthQueryRunner(runner: AuthQueryRunner): void {
    this.authQuery = runner;
  }

  /** The auth_user's own secret, always from auth_file (as in PgBouncer). */
  authUserSecret(): Secret | null {
    const user = this.auth?.auth_user;
    if (user === undefined) return null;
    const stored = this.fileSecrets.get(user);
    return stored === undefined ? null : secretFromStored(stored);
  }

  /** The secret a client must prove knowledge of: auth_file first, then auth_query. */
  async lookup(role: string): Promise<Secret | null> {
    const stored = this.fileSecrets.get(role);
    let secret: Secret | null = stored === undefined ? null : secretFromStored(stored);
    if (secret === null && this.authQuery !== null && this.auth?.auth_user !== undefined) {
      const fetched = await this.authQuery(role);
      secret = fetched === null ? null : secretFromStored(fetched);
    }
    if (secret !== null) this.mergeBackendSecret(role, secret);
    return secret;
  }

  /** Keeps the strongest usable form: a ClientKey learned earlier survives a re-read of the same verifier. */
  private mergeBackendSecret(role: string, secret: Secret): void {
    const prev = this.backendSecrets.get(role);
    if (
      secret.kind === 'scram' &&
      prev?.kind === 'scram' &&
      prev.keys.clientKey !== undefined &&
      prev.keys.storedKey.equals(secret.keys.storedKey)
    ) {
      return;
    }
    this.backendSecrets.set(role, secret);
  }

  /** What a backend login for `role` can use now, or null when no client has logged in as it yet. */
  backendSecret(role: string): Secret | null {
    const s = this.backendSecrets.get(role);
    if (s === undefined) return null;
    if (s.kind === 'scram' && s.keys.clientKey === undefined) return null;
    return s;
  }

  /**
   * Whether the proxy can open backend connections for `role` with no password from the client (token
   * logins, HTTP requests): auth_file or auth_query is consulted, and the secret found must be usable.
   */
  async canLogInWithoutClient(role: string): Promise<boolean> {
    await this.lookup(role);
    return this.backendSecret(role) !== null;
  }

  /** Records what a successful login taught the proxy (a ClientKey, or keys derived from a cleartext password). */
  learn(role: string, secret: Secret): void {
    this.backendSecrets.set(role, secret);
    this.learnedAt.set(role, Date.now());
  }

  forget(role: string): void {
    this.backendSecrets.delete(role);
  }

  /**
   * Passthrough mode: checks a cleartext password against what an earlier backend login taught the proxy.
   * 'unknown' means the backend has to judge it.
   */
  async verifyLearned(role: string, password: string): Promise<'match' | 'unknown'> {
    const s = this.backendSecrets.get(role);
    // After a while the backend judges again, so a password changed in PostgreSQL takes effect.
    if (s === undefined || Date.now() - (this.learnedAt.get(role) ?? 0) > LEARNED_TTL_MS) return 'unknown';
    if (s.kind === 'plain') return s.password === password ? 'match' : 'unknown';
    if (s.kind === 'scram') {
      const keys = await cachedDerive(password, s.keys.salt, s.keys.iterations);
      return keys.storedKey.equals(s.keys.storedKey) ? 'match' : 'unknown';
    }
    return 'unknown';
  }
}
