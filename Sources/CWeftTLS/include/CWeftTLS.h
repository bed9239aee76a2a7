#ifndef WEFT_CWEFTTLS_H
#define WEFT_CWEFTTLS_H
#include <stddef.h>
#include <stdint.h>

// A TLS endpoint over memory buffers (OpenSSL's libssl, memory BIOs): the
// network shell feeds it the bytes it received and sends the bytes it
// drains; it never touches a socket. Contexts verify the peer against one
// CA and require a certificate from it (mutual TLS), TLS 1.2 or later.

typedef struct weft_tls_ctx weft_tls_ctx;
typedef struct weft_tls weft_tls;

/// NULL on failure, with the reason in `err` (NUL-terminated).
weft_tls_ctx *weft_tls_ctx_new(const char *ca_file, const char *cert_file, const char *key_file, char *err, size_t err_len);
void weft_tls_ctx_free(weft_tls_ctx *ctx);

weft_tls *weft_tls_new(weft_tls_ctx *ctx, int is_server);
void weft_tls_free(weft_tls *t);

/// Bytes received from the peer.
int weft_tls_feed(weft_tls *t, const uint8_t *data, size_t len);
/// Advances the handshake: 1 done, 0 needs more bytes, -1 failed (reason in err).
int weft_tls_handshake(weft_tls *t, char *err, size_t err_len);
/// Decrypted bytes into buf: >0 count, 0 none available now, -1 failed, -2 peer closed.
int weft_tls_read(weft_tls *t, uint8_t *buf, size_t len, char *err, size_t err_len);
/// Encrypts len bytes (all of them, or -1).
int weft_tls_write(weft_tls *t, const uint8_t *data, size_t len, char *err, size_t err_len);
/// Bytes waiting to be sent to the peer.
size_t weft_tls_pending_out(weft_tls *t);
/// Takes up to len of them.
int weft_tls_drain(weft_tls *t, uint8_t *buf, size_t len);
#endif
