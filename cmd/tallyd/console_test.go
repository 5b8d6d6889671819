package main

import (
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"regexp"
	"strings"
	"testing"
)

// tallyd serve --console-addr serves the console, which reaches the API
// through the server's own interceptors: a key signs in and a page reads.
func TestServeConsole(t *testing.T) {
	dburl := newDB(t)
	key := withAdminKey(t, dburl)
	c := baseConfig(dburl)
	c.console.addr = "127.0.0.1:0"
	urls := make(chan string, 1)
	c.consoleStarted = func(u string) { urls <- u }
	_, _, stop := startServe(t, c)
	defer stop()
	base := strings.TrimSuffix(<-urls, "/")
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar}
	get := func(path string) (*http.Response, string) {
		res, err := hc.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res, string(b)
	}
	res, page := get("/signin")
	if res.StatusCode != http.StatusOK || res.Header.Get("X-Frame-Options") != "DENY" {
		t.Fatalf("sign-in page: %d %v", res.StatusCode, res.Header)
	}
	csrf := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindStringSubmatch(page)[1]
	res, err := hc.PostForm(base+"/signin", url.Values{"csrf": {csrf}, "api_key": {key}})
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK || res.Request.URL.Path != "/" {
		t.Fatalf("after sign-in: %d at %s", res.StatusCode, res.Request.URL)
	}
	if res, page := get("/search?q=nobody-has-this-ref"); res.StatusCode != http.StatusOK || !strings.Contains(page, "Nothing found") {
		t.Fatalf("search through the API: %d\n%s", res.StatusCode, page)
	}
}
