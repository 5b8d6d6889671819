package console

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/tallyledger/tally/auth"
)

// Cookie names: the session, and the sign-in form's CSRF token (a
// double-submitted cookie, since there is no session yet).
const (
	sessionCookie = "tally_console"
	signInCookie  = "tally_console_signin"
)

// session is a signed-in API key, kept only in this process's memory.
type session struct {
	id      string
	key     string // the API key: never logged, never sent to the browser
	csrf    string
	p       auth.Principal
	expires time.Time
}

// sessions is the table of live sessions.
type sessions struct {
	mu  sync.Mutex
	m   map[string]*session
	max int
	ttl time.Duration
	now func() time.Time
}

func newSessions(max int, ttl time.Duration, now func() time.Time) *sessions {
	return &sessions{m: map[string]*session{}, max: max, ttl: ttl, now: now}
}

var errTooManySessions = errors.New("too many sessions")

// randomID returns 32 random bytes, base64url.
func randomID() string {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// create starts a session for key.
func (s *sessions) create(key string, p auth.Principal) (*session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if len(s.m) >= s.max {
		for id, x := range s.m {
			if !now.Before(x.expires) {
				delete(s.m, id)
			}
		}
		if len(s.m) >= s.max {
			return nil, errTooManySessions
		}
	}
	x := &session{id: randomID(), key: key, csrf: randomID(), p: p, expires: now.Add(s.ttl)}
	s.m[x.id] = x
	return x, nil
}

// get returns the live session of id.
func (s *sessions) get(id string) (*session, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	x, ok := s.m[id]
	if !ok {
		return nil, false
	}
	if !s.now().Before(x.expires) {
		delete(s.m, id)
		return nil, false
	}
	return x, true
}

// end removes a session.
func (s *sessions) end(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, id)
}

// sameToken compares tokens in constant time.
func sameToken(a, b string) bool {
	return a != "" && subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

// setCookie sets an HttpOnly, SameSite=Strict cookie, Secure under TLS.
func setCookie(w http.ResponseWriter, r *http.Request, name, value string, maxAge int) {
	http.SetCookie(w, &http.Cookie{Name: name, Value: value, Path: "/", MaxAge: maxAge, HttpOnly: true,
		Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
}

// handler is a page that needs a session.
type handler func(w http.ResponseWriter, r *http.Request, s *session)

// authed runs h with the request's session: no session (or an expired
// one) redirects to sign-in; a key that no longer verifies (revoked,
// expired) ends the session; a POST without the session's CSRF token is
// refused.
func (c *Console) authed(h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s := c.sessionOf(r)
		if s == nil {
			http.Redirect(w, r, "/signin", http.StatusSeeOther)
			return
		}
		if _, err := c.verify(r.Context(), s.key); err != nil {
			if errors.Is(err, auth.ErrUnavailable) {
				c.fail(w, r, s, http.StatusServiceUnavailable, "Cannot check your key right now; try again shortly.")
				return
			}
			c.sessions.end(s.id)
			c.log.InfoContext(r.Context(), "console: session ended: key no longer valid", "key_id", s.p.KeyID)
			setCookie(w, r, sessionCookie, "", -1)
			http.Redirect(w, r, "/signin?ended=1", http.StatusSeeOther)
			return
		}
		if r.Method == http.MethodPost && !sameToken(r.PostFormValue("csrf"), s.csrf) {
			c.log.InfoContext(r.Context(), "console: POST without a valid CSRF token refused", "key_id", s.p.KeyID, "path", r.URL.Path)
			c.fail(w, r, s, http.StatusForbidden, "This form has expired or did not come from the console. Go back, reload the page and try again.")
			return
		}
		h(w, r, s)
	}
}

// sessionOf returns the request's live session, or nil.
func (c *Console) sessionOf(r *http.Request) *session {
	ck, err := r.Cookie(sessionCookie)
	if err != nil || ck.Value == "" {
		return nil
	}
	s, ok := c.sessions.get(ck.Value)
	if !ok {
		return nil
	}
	return s
}
