// OpenSSL's libcrypto (Debian's libssl-dev): HMAC-SHA256 for the cluster
// handshake, random bytes for secrets and nonces, constant-time compare.
#include <openssl/hmac.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/crypto.h>
