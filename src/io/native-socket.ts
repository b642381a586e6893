// io/ owns the byte transport under client sessions and backend connections: the ByteStream both use,
// and NativeSocket, which takes an authenticated plaintext TCP socket over from Node's net.Socket so the
// relay's reads and writes skip Node's stream layer (native/fastio.c). Everything above this folder sees
// the same events either way: 'data', 'drain', 'end', 'error', 'close'.
import { EventEmitter } from 'node:events';
import { createRequire } from 'node:module';
import { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import { getSystemErrorName } from 'node:util';

/** What sessions and backend connections need of a socket; net.Socket, TLSSocket and NativeSocket all are. */
export interface ByteStream {
  write(data: Buffer | string): boolean;
  end(): unknown;
  end(data: Buffer | string): unknown;
  destroy(error?: Error): unknown;
  pause(): unknown;
  resume(): unknown;
  isPaused(): boolean;
  cork(): void;
  uncork(): void;
  readonly destroyed: boolean;
  readonly writableEnded: boolean;
  readonly remoteAddress?: string | undefined;
  readonly remotePort?: number | undefined;
  on(event: 'data', listener: (chunk: Buffer) => void): unknown;
  on(event: 'error', listener: (err: Error) => void): unknown;
  on(event: 'close' | 'end' | 'drain', listener: () => void): unknown;
  once(event: 'data', listener: (chunk: Buffer) => void): unknown;
  once(event: 'error', listener: (err: Error) => void): unknown;
  once(event: 'close' | 'end' | 'drain', listener: () => void): unknown;
  off(event: 'data', listener: (chunk: Buffer) => void): unknown;
  removeAllListeners(event?: string): unknown;
}

/** The addon's surface (native/fastio.c). A channel is an opaque handle. */
interface Channel {
  readonly __channel: unique symbol;
}
interface FastIo {
  setReadBuffer(buf: Buffer): void;
  open(fd: number, onEvent: (kind: number, value: number) => void): Channel;
  write(ch: Channel, data: Buffer): number;
  writev(ch: Channel, data: Buffer[]): number;
  setReading(ch: Channel, on: boolean): void;
  shutdown(ch: Channel): number;
  queued(ch: Channel): number;
  close(ch: Channel): void;
}

/** EventEmitter's own listener type, for the overrides below. */
type EmitterListener = Parameters<EventEmitter['on']>[1];

const EV_DATA = 0;
const EV_END = 1;
const EV_ERROR = 2;
const EV_DRAIN = 3;

/** Where every channel's read(2) lands; each read is copied out at once (see onEvent). */
const readBuffer = Buffer.allocUnsafeSlow(65536);

function loadFastIo(): { io: FastIo | null; why: string } {
  try {
    const io = createRequire(import.meta.url)('../../build/Release/fastio.node') as FastIo;
    io.setReadBuffer(readBuffer);
    return { io, why: 'native/fastio.c built' };
  } catch (err) {
    return { io: null, why: `native/fastio.c not built (${err instanceof Error ? err.message.split('\n')[0] : String(err)}); run npm install with a C compiler` };
  }
}

const loaded = loadFastIo();

/** Whether the native socket layer can be used, and why not when it cannot. */
export const nativeSocketLayer: { readonly available: boolean; readonly reason: string } = {
  available: loaded.io !== null,
  reason: loaded.why,
};

/** Connections on the native layer right now (client and backend), for the admin API. */
export const nativeSocketStats = { open: 0 };

/** The file descriptor behind a connected net.Socket (Node keeps it on its internal TCP handle). */
function socketFd(socket: Socket): number | null {
  const handle = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle;
  const fd = handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}

/**
 * Moves a connected plaintext TCP socket onto the native layer, or returns null to keep it as it is: TLS
 * sockets, in-process streams, and sockets with bytes still queued in Node (either way) stay with Node,
 * since moving them would reorder or lose bytes.
 */
export function adoptSocket(socket: ByteStream): NativeSocket | null {
  const io = loaded.io;
  if (io === null || !(socket instanceof Socket) || socket instanceof TLSSocket) return null;
  if (socket.destroyed || socket.connecting || socket.writableLength > 0 || socket.readableLength > 0) return null;
  const fd = socketFd(socket);
  if (fd === null) return null;
  const { remoteAddress, remotePort } = socket;
  socket.pause();
  const adopted = new NativeSocket(io, fd, remoteAddress, remotePort);
  // The channel holds its own dup of the descriptor: Node's handle closes the original and the
  // connection stays open. Its listeners belong to the old object and must not see that close.
  socket.removeAllListeners();
  socket.on('error', () => {});
  socket.destroy();
  return adopted;
}

function errnoError(code: number, syscall: string): NodeJS.ErrnoException {
  const name = getSystemErrorName(code);
  const err: NodeJS.ErrnoException = new Error(`${syscall} ${name}`);
  err.code = name;
  err.errno = code;
  err.syscall = syscall;
  return err;
}

/**
 * A TCP connection driven by native/fastio.c. Mirrors net.Socket with allowHalfOpen = false: when the
 * peer ends, whatever is queued is written and the socket closes. write() returns false while bytes
 * wait in the channel's queue, and 'drain' follows once the kernel took them.
 */
export class NativeSocket extends EventEmitter implements ByteStream {
  destroyed = false;
  writableEnded = false;
  private readableEnded = false;
  private paused = false;
  private corked = 0;
  // What a cork held back: the common case is one message, kept without an array.
  private corkedFirst: Buffer | null = null;
  private corkedRest: Buffer[] | null = null;
  private queued = false;
  private channel: Channel;
  /**
   * The relay's one 'data' listener, called directly: EventEmitter's lookup by event name is a
   * megamorphic load on every read. See on() for when the emitter takes over.
   */
  private dataListener: ((chunk: Buffer) => void) | null = null;

  constructor(
    private readonly io: FastIo,
    fd: number,
    readonly remoteAddress: string | undefined,
    readonly remotePort: number | undefined,
  ) {
    super();
    this.channel = io.open(fd, (kind, value) => this.onEvent(kind, value));
    nativeSocketStats.open++;
  }

  private onEvent(kind: number, value: number): void {
    if (this.destroyed) return;
    if (kind === EV_DATA) {
      // A slice of Node's Buffer pool for small reads: the bytes outlive the shared read buffer.
      const chunk = Buffer.allocUnsafe(value);
      readBuffer.copy(chunk, 0, 0, value);
      const listener = this.dataListener;
      if (listener !== null) listener(chunk);
      else this.emit('data', chunk);
    } else if (kind === EV_DRAIN) {
      this.queued = false;
      if (this.writableEnded && this.readableEnded) this.destroy();
      else this.emit('drain');
    } else if (kind === EV_END) {
      this.readableEnded = true;
      this.emit('end');
      if (this.destroyed) return;
      if (!this.writableEnded) this.end();
      else if (!this.queued) this.destroy();
    } else if (kind === EV_ERROR) this.destroy(errnoError(value, 'read'));
  }

  write(data: Buffer | string): boolean {
    if (this.destroyed || this.writableEnded) return false;
    const buf = typeof data === 'string' ? Buffer.from(data) : data;
    if (this.corked > 0) {
      if (this.corkedFirst === null) this.corkedFirst = buf;
      else (this.corkedRest ??= []).push(buf);
      return !this.queued;
    }
    return this.sent(this.io.write(this.channel, buf));
  }

  private sent(result: number): boolean {
    if (result === 0) return !this.queued;
    if (result === 1) {
      this.queued = true;
      return false;
    }
    this.destroy(errnoError(result, 'write'));
    return false;
  }

  cork(): void {
    this.corked++;
  }

  uncork(): void {
    if (this.corked === 0 || --this.corked > 0) return;
    const first = this.corkedFirst;
    const rest = this.corkedRest;
    if (first === null || this.destroyed) return;
    this.corkedFirst = null;
    this.corkedRest = null;
    this.sent(rest === null ? this.io.write(this.channel, first) : this.io.writev(this.channel, [first, ...rest]));
  }

  pause(): this {
    if (!this.paused && !this.destroyed) {
      this.paused = true;
      this.io.setReading(this.channel, false);
    }
    return this;
  }

  resume(): this {
    if (this.paused && !this.destroyed) {
      this.paused = false;
      if (!this.readableEnded) this.io.setReading(this.channel, true);
    }
    return this;
  }

  isPaused(): boolean {
    return this.paused;
  }

  /** Writes `data`, then half-closes once everything queued is out (as net.Socket.end). */
  end(data?: Buffer | string): this {
    if (this.destroyed || this.writableEnded) return this;
    if (data !== undefined) this.write(data);
    if (this.corked > 0) {
      this.corked = 1;
      this.uncork();
    }
    if (this.destroyed) return this;
    this.writableEnded = true;
    let r = this.io.shutdown(this.channel);
    if (r === -107) r = 0; // ENOTCONN: the peer is already gone, so our side is as closed as it gets
    if (r < 0) this.destroy(errnoError(r, 'shutdown'));
    else if (this.readableEnded && r === 0) this.destroy();
    return this;
  }

  // The slot holds the 'data' listener only while it is the only one: anything else registering for 'data'
  // (a second on(), once(), a prepend) moves it into the emitter first, where order and once-wrappers
  // work as EventEmitter defines them.
  override on(event: string | symbol, listener: EmitterListener): this {
    if (event === 'data' && this.dataListener === null && super.listenerCount('data') === 0 && !('listener' in listener)) {
      this.dataListener = listener as (chunk: Buffer) => void;
      return this;
    }
    if (event === 'data') this.unslotData();
    return super.on(event, listener);
  }

  override addListener(event: string | symbol, listener: EmitterListener): this {
    return this.on(event, listener);
  }

  override prependListener(event: string | symbol, listener: EmitterListener): this {
    if (event === 'data') this.unslotData();
    return super.prependListener(event, listener);
  }

  override prependOnceListener(event: string | symbol, listener: EmitterListener): this {
    if (event === 'data') this.unslotData();
    return super.prependOnceListener(event, listener);
  }

  // EventEmitter's once() removes its wrapper with removeListener, which off() is an alias of.
  override removeListener(event: string | symbol, listener: EmitterListener): this {
    if (event === 'data' && listener === this.dataListener) this.dataListener = null;
    else super.removeListener(event, listener);
    return this;
  }

  override off(event: string | symbol, listener: EmitterListener): this {
    return this.removeListener(event, listener);
  }

  override removeAllListeners(event?: string | symbol): this {
    if (event === undefined || event === 'data') this.dataListener = null;
    return super.removeAllListeners(event);
  }

  override listenerCount(event: string | symbol): number {
    return super.listenerCount(event) + (event === 'data' && this.dataListener !== null ? 1 : 0);
  }

  override listeners(event: string | symbol): EmitterListener[] {
    const l = super.listeners(event) as EmitterListener[];
    return event === 'data' && this.dataListener !== null ? [this.dataListener, ...l] : l;
  }

  private unslotData(): void {
    const l = this.dataListener;
    if (l === null) return;
    this.dataListener = null;
    super.on('data', l);
  }

  destroy(error?: Error): this {
    if (this.destroyed) return this;
    this.destroyed = true;
    this.writableEnded = true;
    this.corkedFirst = null;
    this.corkedRest = null;
    this.io.close(this.channel);
    nativeSocketStats.open--;
    // As net.Socket: 'error' and 'close' come after the current call stack, never inside it.
    process.nextTick(() => {
      if (error !== undefined && this.listenerCount('error') > 0) this.emit('error', error);
      this.emit('close', error !== undefined);
    });
    return this;
  }
}
