// See CWeftTLS.h. OpenSSL's macros (SSL_CTX_set_min_proto_version, ...)
// are used here, where C sees them; Swift calls plain functions.
#include "CWeftTLS.h"
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <stdio.h>
#include <string.h>

struct weft_tls_ctx { SSL_CTX *ssl_ctx; };
struct weft_tls { SSL *ssl; BIO *in; BIO *out; };

static void reason(char *err, size_t len, const char *what) {
    if (!err || len == 0) return;
    unsigned long e = ERR_get_error();
    char buf[256] = "";
    if (e) ERR_error_string_n(e, buf, sizeof buf);
    snprintf(err, len, "%s%s%s", what, e ? ": " : "", buf);
    ERR_clear_error();
}

weft_tls_ctx *weft_tls_ctx_new(const char *ca_file, const char *cert_file, const char *key_file, char *err, size_t err_len) {
    SSL_CTX *c = SSL_CTX_new(TLS_method());
    if (!c) { reason(err, err_len, "cannot create a TLS context"); return NULL; }
    SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
    if (SSL_CTX_use_certificate_chain_file(c, cert_file) != 1) { reason(err, err_len, "cannot load the certificate"); SSL_CTX_free(c); return NULL; }
    if (SSL_CTX_use_PrivateKey_file(c, key_file, SSL_FILETYPE_PEM) != 1) { reason(err, err_len, "cannot load the private key"); SSL_CTX_free(c); return NULL; }
    if (SSL_CTX_check_private_key(c) != 1) { reason(err, err_len, "the private key does not match the certificate"); SSL_CTX_free(c); return NULL; }
    if (SSL_CTX_load_verify_locations(c, ca_file, NULL) != 1) { reason(err, err_len, "cannot load the CA certificate"); SSL_CTX_free(c); return NULL; }
    // Both sides present a certificate and verify the other's chain to the CA.
    SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca_file);
    if (names) SSL_CTX_set_client_CA_list(c, names);
    SSL_CTX_set_session_cache_mode(c, SSL_SESS_CACHE_OFF);
    weft_tls_ctx *ctx = calloc(1, sizeof *ctx);
    ctx->ssl_ctx = c;
    return ctx;
}

void weft_tls_ctx_free(weft_tls_ctx *ctx) {
    if (!ctx) return;
    SSL_CTX_free(ctx->ssl_ctx);
    free(ctx);
}

weft_tls *weft_tls_new(weft_tls_ctx *ctx, int is_server) {
    weft_tls *t = calloc(1, sizeof *t);
    t->ssl = SSL_new(ctx->ssl_ctx);
    t->in = BIO_new(BIO_s_mem());
    t->out = BIO_new(BIO_s_mem());
    BIO_set_mem_eof_return(t->in, -1);  // empty means "wait", not EOF
    SSL_set_bio(t->ssl, t->in, t->out);  // the SSL owns both BIOs now
    if (is_server) SSL_set_accept_state(t->ssl); else SSL_set_connect_state(t->ssl);
    return t;
}

void weft_tls_free(weft_tls *t) {
    if (!t) return;
    SSL_free(t->ssl);
    free(t);
}

int weft_tls_feed(weft_tls *t, const uint8_t *data, size_t len) {
    return BIO_write(t->in, data, (int)len) == (int)len ? 0 : -1;
}

int weft_tls_handshake(weft_tls *t, char *err, size_t err_len) {
    int r = SSL_do_handshake(t->ssl);
    if (r == 1) return 1;
    int e = SSL_get_error(t->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
    long v = SSL_get_verify_result(t->ssl);
    if (v != X509_V_OK) {
        snprintf(err, err_len, "TLS handshake failed: the peer's certificate is not trusted (%s)", X509_verify_cert_error_string(v));
        ERR_clear_error();
    } else {
        reason(err, err_len, "TLS handshake failed");
    }
    return -1;
}

int weft_tls_read(weft_tls *t, uint8_t *buf, size_t len, char *err, size_t err_len) {
    int r = SSL_read(t->ssl, buf, (int)len);
    if (r > 0) return r;
    int e = SSL_get_error(t->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
    if (e == SSL_ERROR_ZERO_RETURN) return -2;
    reason(err, err_len, "TLS read failed");
    return -1;
}

int weft_tls_write(weft_tls *t, const uint8_t *data, size_t len, char *err, size_t err_len) {
    size_t done = 0;
    while (done < len) {
        size_t chunk = len - done > (1u << 30) ? (1u << 30) : len - done;
        int r = SSL_write(t->ssl, data + done, (int)chunk);
        if (r <= 0) { reason(err, err_len, "TLS write failed"); return -1; }
        done += (size_t)r;
    }
    return 0;
}

size_t weft_tls_pending_out(weft_tls *t) { return BIO_ctrl_pending(t->out); }

int weft_tls_drain(weft_tls *t, uint8_t *buf, size_t len) {
    int r = BIO_read(t->out, buf, (int)len);
    return r > 0 ? r : 0;
}
