// protocol/ owns the PostgreSQL v3 wire format: splitting a byte stream into messages and building the
// few messages the proxy originates. Framing never copies a complete message: callers get the chunk and
// offsets, so what is only forwarded is written back out as a subarray of the bytes that arrived.

/** Something that consumes framed messages. `start` is the offset of the type byte; `end` is exclusive. */
export interface FrameSink {
  message(buf: Buffer, start: number, end: number): void;
  /** Called once after every message of a chunk was delivered: the moment to flush batched writes. */
  batchEnd(): void;
}

export class ProtocolViolation extends Error {}

/** PostgreSQL accepts messages up to 1 GiB; a proxy that buffers whole messages caps lower to stay bounded. */
export const MAX_MESSAGE_LENGTH = 256 * 1024 * 1024;

/**
 * Frames typed messages (1-byte type + int32 length that counts itself + body).
 * Only a trailing partial message is ever copied (to join it with the next chunk).
 */
export class MessageFramer {
  private partial: Buffer | null = null;

  constructor(private readonly maxLength: number = MAX_MESSAGE_LENGTH) {}

  feed(chunk: Buffer, sink: FrameSink): void {
    let buf = chunk;
    if (this.partial !== null) {
      buf = Buffer.concat([this.partial, chunk]);
      this.partial = null;
    }
    let offset = 0;
    const size = buf.length;
    while (size - offset >= 5) {
      const length = buf.readInt32BE(offset + 1);
      if (length < 4 || length > this.maxLength) {
        throw new ProtocolViolation(`invalid message length ${length} for message type 0x${buf[offset]!.toString(16)}`);
      }
      const end = offset + 1 + length;
      if (end > size) break;
      sink.message(buf, offset, end);
      offset = end;
    }
    if (offset < size) this.partial = buf.subarray(offset);
    sink.batchEnd();
  }

  /** Bytes received but not yet framed (a message still arriving). */
  get buffered(): number {
    return this.partial === null ? 0 : this.partial.length;
  }
}

/**
 * Frames the untyped messages a client sends before authentication (StartupMessage, SSLRequest,
 * CancelRequest, GSSENCRequest): int32 length then body. Returns the message, or null when incomplete.
 */
export class StartupFramer {
  private buf: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
  }

  next(): Buffer | null {
    if (this.buf.length < 4) return null;
    const length = this.buf.readInt32BE(0);
    // PostgreSQL caps startup packets at 10000 bytes (MAX_STARTUP_PACKET_LENGTH).
    if (length < 8 || length > 10000) throw new ProtocolViolation(`invalid startup packet length ${length}`);
    if (this.buf.length < length) return null;
    const msg = this.buf.subarray(0, length);
    this.buf = this.buf.subarray(length);
    return msg;
  }

  /** Whatever followed the last startup-phase message (a client may pipeline its first typed messages). */
  takeRest(): Buffer {
    const rest = this.buf;
    this.buf = Buffer.alloc(0);
    return rest;
  }
}
