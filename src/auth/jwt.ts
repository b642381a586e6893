// auth/ owns credentials. This file verifies JSON Web Tokens (with jose) and reads the tenant from a claim:
// the identity of wire logins with method = "jwt_claim" and of HTTP requests with identify_by = "jwt_claim".
// Errors say what was wrong with the token (expired, wrong audience, bad signature) and nothing about keys.
import { createPublicKey, createSecretKey, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { createLocalJWKSet, errors, jwtVerify, type JSONWebKeySet, type JWTVerifyGetKey } from 'jose';
import type { JwtConfig } from '../config/schema.js';

const HMAC = ['HS256', 'HS384', 'HS512'];
const RSA = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512'];
const EC = ['ES256', 'ES384', 'ES512'];
const OKP = ['EdDSA'];

/** A token that does not let its bearer in; `code` is the SQLSTATE a wire login fails with. */
export class TokenRefused extends Error {
  constructor(
    readonly code: '28000' | '28P01',
    message: string,
  ) {
    super(message);
  }
}

/** What a verified token says. */
export interface VerifiedToken {
  tenantId: string;
  subject: string | undefined;
}

export class JwtVerifier {
  private readonly key: KeyObject | JWTVerifyGetKey;
  private readonly algorithms: string[];

  /** Reads key material; throws Error with a message naming the key at fault (config load turns it into a problem). */
  constructor(
    private readonly config: JwtConfig,
    baseDir: string,
  ) {
    const given = [config.secret, config.public_key_file, config.jwks_file].filter((v) => v !== undefined).length;
    if (given !== 1) throw new Error('multi_tenancy.identification.jwt: set exactly one of secret, public_key_file or jwks_file');
    let usable: string[];
    if (config.secret !== undefined) {
      this.key = createSecretKey(Buffer.from(config.secret, 'utf8'));
      usable = HMAC;
    } else if (config.public_key_file !== undefined) {
      const path = resolve(baseDir, config.public_key_file);
      let key: KeyObject;
      try {
        key = createPublicKey(readFileSync(path));
      } catch (err) {
        throw new Error(`multi_tenancy.identification.jwt.public_key_file: cannot read a PEM public key or certificate from ${path}: ${(err as Error).message}`);
      }
      this.key = key;
      const type = key.asymmetricKeyType;
      usable = type === 'rsa' || type === 'rsa-pss' ? RSA : type === 'ec' ? EC : type === 'ed25519' ? OKP : [];
      if (usable.length === 0) throw new Error(`multi_tenancy.identification.jwt.public_key_file: unsupported key type "${type ?? '?'}"`);
    } else {
      const path = resolve(baseDir, config.jwks_file!);
      let jwks: JSONWebKeySet;
      let text: string;
      try {
        text = readFileSync(path, 'utf8');
      } catch (err) {
        throw new Error(`multi_tenancy.identification.jwt.jwks_file: cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`);
      }
      try {
        // JSON.parse's message quotes the text around the error: the file's keys must not reach logs.
        jwks = JSON.parse(text) as JSONWebKeySet;
      } catch {
        throw new Error(`multi_tenancy.identification.jwt.jwks_file: ${path} is not valid JSON`);
      }
      try {
        if (!Array.isArray(jwks.keys) || jwks.keys.length === 0) throw new Error('no "keys" array');
        this.key = createLocalJWKSet(jwks);
      } catch (err) {
        throw new Error(`multi_tenancy.identification.jwt.jwks_file: cannot read a JWKS document from ${path}: ${(err as Error).message}`);
      }
      // Symmetric keys do not belong in a published key set: only public-key algorithms are accepted from it.
      usable = [...RSA, ...EC, ...OKP];
    }
    if (config.algorithms !== undefined) {
      const wrong = config.algorithms.filter((a) => !usable.includes(a));
      if (wrong.length > 0) {
        throw new Error(`multi_tenancy.identification.jwt.algorithms: ${wrong.join(', ')} cannot be verified with the configured ${config.secret !== undefined ? 'secret' : 'key'}`);
      }
      this.algorithms = [...config.algorithms];
    } else this.algorithms = usable;
  }

  get claim(): string {
    return this.config.claim;
  }

  async verify(token: string): Promise<VerifiedToken> {
    let payload: Record<string, unknown>;
    try {
      const options = {
        algorithms: this.algorithms,
        clockTolerance: this.config.clock_skew_secs,
        // A token that never expires is a password that can never be revoked.
        requiredClaims: ['exp'],
        ...(this.config.issuer !== undefined ? { issuer: this.config.issuer } : {}),
        ...(this.config.audience !== undefined ? { audience: this.config.audience } : {}),
      };
      const key = this.key;
      const result = typeof key === 'function' ? await jwtVerify(token, key, options) : await jwtVerify(token, key, options);
      payload = result.payload;
    } catch (err) {
      throw refusal(err);
    }
    const value = payload[this.config.claim];
    if (typeof value !== 'string' || value === '') {
      throw new TokenRefused('28000', `token has no "${this.config.claim}" claim naming a tenant`);
    }
    return { tenantId: value, subject: typeof payload.sub === 'string' ? payload.sub : undefined };
  }
}

function refusal(err: unknown): TokenRefused {
  if (err instanceof errors.JWTExpired) return new TokenRefused('28P01', 'token has expired');
  if (err instanceof errors.JWTClaimValidationFailed) {
    const what =
      err.claim === 'exp' ? 'token has no expiry (exp)'
      : err.claim === 'nbf' ? 'token is not valid yet (nbf)'
      : err.claim === 'iss' ? 'token issuer is not accepted'
      : err.claim === 'aud' ? 'token audience is not accepted'
      : err.claim === 'iat' ? 'token issued-at time is not acceptable'
      : `token claim "${err.claim}" is not acceptable`;
    return new TokenRefused('28P01', what);
  }
  if (err instanceof errors.JOSEAlgNotAllowed) return new TokenRefused('28P01', 'token signing algorithm is not allowed');
  if (err instanceof errors.JWSSignatureVerificationFailed) return new TokenRefused('28P01', 'token signature is invalid');
  if (err instanceof errors.JWKSNoMatchingKey || err instanceof errors.JWKSMultipleMatchingKeys) {
    return new TokenRefused('28P01', 'token was not signed by a known key');
  }
  if (err instanceof errors.JOSENotSupported) return new TokenRefused('28P01', 'token uses an unsupported algorithm');
  if (err instanceof errors.JOSEError) return new TokenRefused('28P01', 'token is malformed');
  return new TokenRefused('28P01', 'token could not be verified');
}
