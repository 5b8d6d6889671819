package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/base64"
	"errors"
	"strings"
)

// An API key is "tly_<key id>_<secret>": the key id is 12 lowercase base32
// characters (60 random bits; it names the key in logs, `tallyd keys list`
// and the audit trail, and is not secret), the secret is 32 random bytes
// (256 bits) in unpadded base64url. Only SHA-256(secret) is stored: the
// secret has far more entropy than any password, so a plain hash cannot be
// brute-forced and needs no salt or slow KDF.
const (
	KeyPrefix      = "tly_"
	KeyIDLength    = 12
	secretBytes    = 32
	secretLength   = 43 // base64url of 32 bytes, unpadded
	keyTotalLength = len(KeyPrefix) + KeyIDLength + 1 + secretLength
)

var keyIDEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// ErrMalformedKey means a string is not an API key.
var ErrMalformedKey = errors.New("auth: malformed API key")

// Key is a freshly made API key.
type Key struct {
	ID     string
	Secret string
}

// String is the key as a caller sends it.
func (k Key) String() string { return KeyPrefix + k.ID + "_" + k.Secret }

// NewKey makes a random key.
func NewKey() (Key, error) {
	var id [8]byte
	var secret [secretBytes]byte
	if _, err := rand.Read(id[:]); err != nil {
		return Key{}, err
	}
	if _, err := rand.Read(secret[:]); err != nil {
		return Key{}, err
	}
	return Key{
		ID:     keyIDEncoding.EncodeToString(id[:])[:KeyIDLength],
		Secret: base64.RawURLEncoding.EncodeToString(secret[:]),
	}, nil
}

// ValidKeyID reports whether s has the shape of a key id.
func ValidKeyID(s string) bool {
	if len(s) != KeyIDLength {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < 'a' || c > 'z') && (c < '2' || c > '7') {
			return false
		}
	}
	return true
}

// ParseKey splits a key into its id and secret. It checks the shape only.
func ParseKey(s string) (Key, error) {
	if len(s) != keyTotalLength || !strings.HasPrefix(s, KeyPrefix) {
		return Key{}, ErrMalformedKey
	}
	rest := s[len(KeyPrefix):]
	id, secret := rest[:KeyIDLength], rest[KeyIDLength+1:]
	if rest[KeyIDLength] != '_' || !ValidKeyID(id) {
		return Key{}, ErrMalformedKey
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(secret)
	if err != nil || len(b) != secretBytes {
		return Key{}, ErrMalformedKey
	}
	return Key{ID: id, Secret: secret}, nil
}

// KeyIDOf returns the key id of a token that starts like a key,
// "tly_<key id>_", whatever follows: a wrong secret of any length or
// encoding still names the key it was tried against (for logs). Anything
// else, caller-chosen garbage included, gives false.
func KeyIDOf(s string) (string, bool) {
	if len(s) < len(KeyPrefix)+KeyIDLength+1 || !strings.HasPrefix(s, KeyPrefix) {
		return "", false
	}
	id := s[len(KeyPrefix) : len(KeyPrefix)+KeyIDLength]
	if s[len(KeyPrefix)+KeyIDLength] != '_' || !ValidKeyID(id) {
		return "", false
	}
	return id, true
}

// HashSecret is what api_keys.secret_hash holds for a secret.
func HashSecret(secret string) []byte {
	h := sha256.Sum256([]byte(secret))
	return h[:]
}
