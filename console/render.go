package console

import (
	"bytes"
	"embed"
	"html/template"
	"io/fs"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/internal/statement"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

//go:embed templates/*.html static/*
var assets embed.FS

func staticFS() fs.FS {
	sub, err := fs.Sub(assets, "static")
	if err != nil {
		panic(err)
	}
	return sub
}

// pages are the parsed templates, one set per page (each with the layout).
type pages struct{ m map[string]*template.Template }

var funcs = template.FuncMap{
	"money": statement.Money,
	"units": statement.Units,
	"kind":  statement.Kind,
	"when": func(t interface{ AsTime() time.Time }) string {
		return t.AsTime().UTC().Format("2006-01-02 15:04:05")
	},
	"list": func() []string { return []string{"auto", "external_ref", "account", "transfer", "key", "hold"} },
	"enum": func(v interface{ String() string }, prefix string) string {
		return strings.TrimPrefix(v.String(), prefix)
	},
}

func mustParsePages() *pages {
	names, err := fs.Glob(assets, "templates/*.html")
	if err != nil {
		panic(err)
	}
	p := &pages{m: map[string]*template.Template{}}
	for _, n := range names {
		if n == "templates/layout.html" {
			continue
		}
		t := template.Must(template.New("layout.html").Funcs(funcs).ParseFS(assets, "templates/layout.html", n))
		p.m[strings.TrimSuffix(strings.TrimPrefix(n, "templates/"), ".html")] = t
	}
	return p
}

// view is what every page template gets.
type view struct {
	Title   string
	Session *sessionView
	Error   string
	Notice  string
	Data    any
}

// sessionView is what a page may show of the session: never the key.
type sessionView struct {
	KeyID, Role, CSRF string
}

func viewOf(s *session) *sessionView {
	if s == nil {
		return nil
	}
	return &sessionView{KeyID: s.p.KeyID, Role: string(s.p.Role), CSRF: s.csrf}
}

// render writes page name with data.
func (c *Console) render(w http.ResponseWriter, r *http.Request, code int, name string, v view) {
	t, ok := c.pages.m[name]
	if !ok {
		panic("console: no page " + name)
	}
	var buf bytes.Buffer
	if err := t.Execute(&buf, v); err != nil {
		c.log.ErrorContext(r.Context(), "console: render", "page", name, "err", err.Error())
		http.Error(w, "Something went wrong showing this page.", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write(buf.Bytes())
}

// fail shows an error page.
func (c *Console) fail(w http.ResponseWriter, r *http.Request, s *session, code int, msg string) {
	c.render(w, r, code, "error", view{Title: "Error", Session: viewOf(s), Error: msg})
}

// apiError shows a failed API call as a friendly message: the API's own
// message for a bad request (it never holds SQL), a plain sentence for the
// rest. An UNAUTHENTICATED answer ends the session.
func (c *Console) apiError(w http.ResponseWriter, r *http.Request, s *session, err error) {
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unauthenticated:
		c.sessions.end(s.id)
		setCookie(w, r, sessionCookie, "", -1)
		http.Redirect(w, r, "/signin?ended=1", http.StatusSeeOther)
	case codes.PermissionDenied:
		c.fail(w, r, s, http.StatusForbidden, "Your role ("+string(s.p.Role)+") may not do this.")
	case codes.NotFound:
		c.fail(w, r, s, http.StatusNotFound, "Not found: "+st.Message())
	case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange:
		c.fail(w, r, s, http.StatusBadRequest, st.Message())
	case codes.ResourceExhausted, codes.Unavailable, codes.DeadlineExceeded:
		c.fail(w, r, s, http.StatusServiceUnavailable, "Tally is busy or unreachable right now; try again shortly.")
	default:
		c.log.ErrorContext(r.Context(), "console: API call failed", "code", st.Code().String(), "key_id", s.p.KeyID)
		c.fail(w, r, s, http.StatusInternalServerError, "Something went wrong; try again, and tell the Tally operators if it keeps happening.")
	}
}

// accountTypeName names an account type for people.
func accountTypeName(t tallyv1.AccountType) string {
	return strings.TrimPrefix(t.String(), "ACCOUNT_TYPE_")
}
