// fastio: a socket for the proxy's relay that skips Node's stream layer.
//
// Why: on a 2-core machine a transaction through the proxy costs two reads and two writes, and Node's
// net.Socket adds per call a Readable push, a Writable queue, a WriteWrap and a nextTick. This channel
// takes over an already connected, already authenticated TCP socket (a dup of its fd), reads with one
// read(2) per readiness event and hands the bytes to one JS callback, and writes with write(2)/writev(2)
// straight from the caller's buffers. Whatever the kernel does not take is copied into the channel's own
// queue and written when the socket is writable again, so JS never has to keep a buffer alive.
//
// Events reach JS as onEvent(kind, value): DATA (byte count now in the read buffer JS registered with
// setReadBuffer; JS copies them out before returning), END (peer closed its side), ERROR (-errno), DRAIN
// (the queue emptied). Functions return 0 when done, 1 when bytes were queued, -errno on failure.
#include <node_api.h>
#include <uv.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

enum { EV_DATA = 0, EV_END = 1, EV_ERROR = 2, EV_DRAIN = 3 };
#define MAX_IOV 64

typedef struct Channel {
  uv_poll_t poll;
  int fd;
  napi_env env;
  napi_ref on_event;
  napi_async_context async_ctx;
  char *queue;
  size_t queue_start, queue_end, queue_cap;
  int reading;         // wants readable events
  int polled_events;   // what the poll handle watches now
  int shutdown_wanted; // shutdown(SHUT_WR) once the queue is empty
  int closing;         // close() called: no more events, no more I/O
  int handle_closed;   // uv_close finished
  int finalized;       // the JS External was collected
} Channel;

// One read buffer for every channel, owned by JS (setReadBuffer): JS slices each read out of Node's
// Buffer pool, which costs no malloc for the small reads a relay mostly sees. One buffer per process
// means one JS thread: the proxy uses the addon from the main thread only, never from workers.
static char *read_buffer = NULL;
static size_t read_buffer_len = 0;
static napi_ref read_buffer_ref = NULL;

static void on_poll(uv_poll_t *handle, int status, int events);

static void update_poll(Channel *c) {
  if (c->closing) return;
  int want = 0;
  if (c->reading) want |= UV_READABLE;
  if (c->queue_end > c->queue_start) want |= UV_WRITABLE;
  if (want == c->polled_events) return;
  c->polled_events = want;
  if (want == 0) uv_poll_stop(&c->poll);
  else uv_poll_start(&c->poll, want, on_poll);
}

static void emit(Channel *c, int kind, napi_value value) {
  napi_env env = c->env;
  napi_value cb, recv, argv[2], result;
  if (napi_get_reference_value(env, c->on_event, &cb) != napi_ok || cb == NULL) return;
  napi_get_global(env, &recv);
  napi_create_int32(env, kind, &argv[0]);
  argv[1] = value;
  // make_callback (not call_function): runs queued microtasks and nextTicks afterwards, as Node's own
  // stream callbacks do.
  if (napi_make_callback(env, c->async_ctx, recv, cb, 2, argv, &result) == napi_pending_exception) {
    // A throwing listener must surface as an uncaught exception, as it would from a net.Socket; left
    // pending, it would swallow every later callback and resurface from an unrelated call.
    napi_value err;
    if (napi_get_and_clear_last_exception(env, &err) == napi_ok) napi_fatal_exception(env, err);
  }
}

static void emit_int(Channel *c, int kind, int value) {
  napi_handle_scope scope;
  napi_open_handle_scope(c->env, &scope);
  napi_value v;
  napi_create_int32(c->env, value, &v);
  emit(c, kind, v);
  napi_close_handle_scope(c->env, scope);
}

// Writes queued bytes; 0 when the queue is empty, 1 when some remain, -errno on failure.
static int flush_queue(Channel *c) {
  while (c->queue_end > c->queue_start) {
    ssize_t n = write(c->fd, c->queue + c->queue_start, c->queue_end - c->queue_start);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
      return -errno;
    }
    c->queue_start += (size_t)n;
  }
  c->queue_start = c->queue_end = 0;
  return 0;
}

static int enqueue(Channel *c, const char *data, size_t len) {
  size_t used = c->queue_end - c->queue_start;
  if (c->queue_start > 0 && used > 0) memmove(c->queue, c->queue + c->queue_start, used);
  c->queue_start = 0;
  c->queue_end = used;
  if (used + len > c->queue_cap) {
    size_t cap = c->queue_cap == 0 ? 16384 : c->queue_cap;
    while (cap < used + len) cap *= 2;
    char *grown = realloc(c->queue, cap);
    if (grown == NULL) return -ENOMEM;
    c->queue = grown;
    c->queue_cap = cap;
  }
  memcpy(c->queue + c->queue_end, data, len);
  c->queue_end += len;
  return 0;
}

static void on_poll(uv_poll_t *handle, int status, int events) {
  Channel *c = (Channel *)handle->data;
  if (c->closing) return;
  if (status < 0) {
    emit_int(c, EV_ERROR, status);
    return;
  }
  if (events & UV_WRITABLE) {
    int r = flush_queue(c);
    if (r < 0) {
      emit_int(c, EV_ERROR, r);
      return;
    }
    if (r == 0) {
      if (c->shutdown_wanted) shutdown(c->fd, SHUT_WR);
      update_poll(c);
      emit_int(c, EV_DRAIN, 0);
      if (c->closing) return;
    }
  }
  if ((events & UV_READABLE) && c->reading && read_buffer != NULL) {
    ssize_t n;
    do n = read(c->fd, read_buffer, read_buffer_len);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n <= 0) {
      int err = n == 0 ? 0 : -errno;
      c->reading = 0;
      update_poll(c);
      if (err == 0) emit_int(c, EV_END, 0);
      else emit_int(c, EV_ERROR, err);
      return;
    }
    emit_int(c, EV_DATA, (int)n);
  }
}

static void on_handle_closed(uv_handle_t *handle) {
  Channel *c = (Channel *)handle->data;
  close(c->fd);
  free(c->queue);
  c->queue = NULL;
  c->handle_closed = 1;
  if (c->finalized) free(c);
}

static void close_channel(Channel *c) {
  if (c->closing) return;
  c->closing = 1;
  napi_delete_reference(c->env, c->on_event);
  napi_async_destroy(c->env, c->async_ctx);
  uv_close((uv_handle_t *)&c->poll, on_handle_closed);
}

static void finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  Channel *c = (Channel *)data;
  c->finalized = 1;
  if (!c->closing) close_channel(c); // unreachable while open: the event callback's reference roots it
  else if (c->handle_closed) free(c);
}

static napi_value make_int(napi_env env, int v) {
  napi_value r;
  napi_create_int32(env, v, &r);
  return r;
}

static Channel *channel_arg(napi_env env, napi_value v) {
  void *p = NULL;
  if (napi_get_value_external(env, v, &p) != napi_ok || p == NULL) {
    napi_throw_type_error(env, NULL, "fastio: expected a channel");
    return NULL;
  }
  return (Channel *)p;
}

// A call whose first argument is a channel: its arguments into argv, and the channel (NULL, with a
// TypeError thrown, when arguments are missing or the first is not a channel).
static Channel *channel_args(napi_env env, napi_callback_info info, napi_value *argv, size_t want) {
  size_t argc = want;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < want) {
    napi_throw_type_error(env, NULL, "fastio: missing arguments");
    return NULL;
  }
  return channel_arg(env, argv[0]);
}

// open(fd, onEvent) -> channel. Duplicates fd, so the caller closes its own copy.
static napi_value js_open(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  if (argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "fastio.open(fd, onEvent)");
    return NULL;
  }
  int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) {
    napi_throw_error(env, NULL, "fastio: dup failed");
    return NULL;
  }
  fcntl(own, F_SETFL, fcntl(own, F_GETFL) | O_NONBLOCK);
  Channel *c = calloc(1, sizeof(Channel));
  if (c == NULL) {
    close(own);
    napi_throw_error(env, NULL, "fastio: out of memory");
    return NULL;
  }
  c->fd = own;
  c->env = env;
  c->reading = 1;
  uv_loop_t *loop;
  napi_get_uv_event_loop(env, &loop);
  if (uv_poll_init_socket(loop, &c->poll, own) != 0) {
    close(own);
    free(c);
    napi_throw_error(env, NULL, "fastio: poll init failed");
    return NULL;
  }
  c->poll.data = c;
  napi_create_reference(env, argv[1], 1, &c->on_event);
  napi_value resource, name;
  napi_create_object(env, &resource);
  napi_create_string_utf8(env, "HeliosSocket", NAPI_AUTO_LENGTH, &name);
  napi_async_init(env, resource, name, &c->async_ctx);
  update_poll(c);
  napi_value ext;
  napi_create_external(env, c, finalize, NULL, &ext);
  return ext;
}

// write(channel, buffer) -> 0 written, 1 queued, -errno
static napi_value js_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  Channel *c = channel_args(env, info, argv, 2);
  if (c == NULL) return NULL;
  if (c->closing) return make_int(env, -EPIPE);
  char *data;
  size_t len;
  if (napi_get_buffer_info(env, argv[1], (void **)&data, &len) != napi_ok) {
    napi_throw_type_error(env, NULL, "fastio.write: expected a Buffer");
    return NULL;
  }
  size_t off = 0;
  if (c->queue_end == c->queue_start) {
    while (off < len) {
      ssize_t n = write(c->fd, data + off, len - off);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return make_int(env, -errno);
      }
      off += (size_t)n;
    }
    if (off == len) return make_int(env, 0);
  }
  int r = enqueue(c, data + off, len - off);
  if (r < 0) return make_int(env, r);
  update_poll(c);
  return make_int(env, 1);
}

// writev(channel, buffers[]) -> as write; one syscall for what a corked writer collected.
static napi_value js_writev(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  Channel *c = channel_args(env, info, argv, 2);
  if (c == NULL) return NULL;
  if (c->closing) return make_int(env, -EPIPE);
  uint32_t count;
  if (napi_get_array_length(env, argv[1], &count) != napi_ok) {
    napi_throw_type_error(env, NULL, "fastio.writev: expected an array of Buffers");
    return NULL;
  }
  struct iovec iov[MAX_IOV];
  uint32_t first = 0;
  int queued = c->queue_end > c->queue_start;
  while (first < count) {
    uint32_t n = 0;
    size_t total = 0;
    for (; n < MAX_IOV && first + n < count; n++) {
      napi_value item;
      napi_get_element(env, argv[1], first + n, &item);
      if (napi_get_buffer_info(env, item, &iov[n].iov_base, &iov[n].iov_len) != napi_ok) {
        napi_throw_type_error(env, NULL, "fastio.writev: expected an array of Buffers");
        return NULL;
      }
      total += iov[n].iov_len;
    }
    size_t done = 0;
    if (!queued) {
      for (;;) {
        ssize_t w = writev(c->fd, iov, (int)n);
        if (w < 0) {
          if (errno == EINTR) continue;
          if (errno == EAGAIN || errno == EWOULDBLOCK) break;
          return make_int(env, -errno);
        }
        done = (size_t)w;
        break;
      }
    }
    if (done < total) {
      // Queue what the kernel did not take, and everything after it in order.
      for (uint32_t i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        if (done >= len) {
          done -= len;
          continue;
        }
        int r = enqueue(c, (const char *)iov[i].iov_base + done, len - done);
        if (r < 0) return make_int(env, r);
        done = 0;
      }
      queued = 1;
    }
    first += n;
  }
  if (!queued) return make_int(env, 0);
  update_poll(c);
  return make_int(env, 1);
}

// setReading(channel, bool): pause and resume without losing bytes (they stay in the kernel).
static napi_value js_set_reading(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  Channel *c = channel_args(env, info, argv, 2);
  if (c == NULL) return NULL;
  bool on = false;
  napi_get_value_bool(env, argv[1], &on);
  if (!c->closing) {
    c->reading = on ? 1 : 0;
    update_poll(c);
  }
  return NULL;
}

// shutdown(channel): half-closes once the queue is written; returns 0 done now, 1 deferred, -errno.
static napi_value js_shutdown(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Channel *c = channel_args(env, info, argv, 1);
  if (c == NULL) return NULL;
  if (c->closing) return make_int(env, -EPIPE);
  if (c->queue_end > c->queue_start) {
    c->shutdown_wanted = 1;
    return make_int(env, 1);
  }
  return make_int(env, shutdown(c->fd, SHUT_WR) == 0 ? 0 : -errno);
}

static napi_value js_queued(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Channel *c = channel_args(env, info, argv, 1);
  if (c == NULL) return NULL;
  return make_int(env, (int)(c->queue_end - c->queue_start));
}

// setReadBuffer(buffer): where every channel reads to; kept alive here.
static napi_value js_set_read_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *data;
  size_t len;
  if (argc < 1 || napi_get_buffer_info(env, argv[0], &data, &len) != napi_ok || len == 0) {
    napi_throw_type_error(env, NULL, "fastio.setReadBuffer(buffer)");
    return NULL;
  }
  if (read_buffer_ref != NULL) napi_delete_reference(env, read_buffer_ref);
  napi_create_reference(env, argv[0], 1, &read_buffer_ref);
  read_buffer = data;
  read_buffer_len = len;
  return NULL;
}

static napi_value js_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  Channel *c = channel_args(env, info, argv, 1);
  if (c != NULL) close_channel(c);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"open", NULL, js_open, NULL, NULL, NULL, napi_default, NULL},
      {"write", NULL, js_write, NULL, NULL, NULL, napi_default, NULL},
      {"writev", NULL, js_writev, NULL, NULL, NULL, napi_default, NULL},
      {"setReading", NULL, js_set_reading, NULL, NULL, NULL, napi_default, NULL},
      {"shutdown", NULL, js_shutdown, NULL, NULL, NULL, napi_default, NULL},
      {"queued", NULL, js_queued, NULL, NULL, NULL, napi_default, NULL},
      {"close", NULL, js_close, NULL, NULL, NULL, napi_default, NULL},
      {"setReadBuffer", NULL, js_set_read_buffer, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
