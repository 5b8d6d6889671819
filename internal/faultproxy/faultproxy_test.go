package faultproxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// startEcho runs a line echo server for the test's lifetime.
func startEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = io.Copy(c, c)
				_ = c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func newProxy(t *testing.T) *Proxy {
	t.Helper()
	p, err := New("127.0.0.1:0", startEcho(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

type client struct {
	c net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, addr string) *client {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &client{c: c, r: bufio.NewReader(c)}
}

// roundTrip sends one line and waits up to timeout for the echo.
func (c *client) roundTrip(line string, timeout time.Duration) (string, error) {
	_ = c.c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c.c, line+"\n"); err != nil {
		return "", err
	}
	s, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	return s[:len(s)-1], nil
}

func mustEcho(t *testing.T, c *client, line string) {
	t.Helper()
	got, err := c.roundTrip(line, 2*time.Second)
	if err != nil || got != line {
		t.Fatalf("echo %q: got %q, %v", line, got, err)
	}
}

func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}

func TestPassThrough(t *testing.T) {
	p := newProxy(t)
	c := dial(t, p.Addr())
	for _, s := range []string{"a", "hello", "third line"} {
		mustEcho(t, c, s)
	}
	// A second, concurrent connection is independent.
	c2 := dial(t, p.Addr())
	mustEcho(t, c2, "other")
	mustEcho(t, c, "again")
}

func TestLatency(t *testing.T) {
	p := newProxy(t)
	c := dial(t, p.Addr())
	mustEcho(t, c, "warm")

	const d = 100 * time.Millisecond
	p.SetLatency(d)
	start := time.Now()
	mustEcho(t, c, "slow")
	rtt := time.Since(start)
	// Both directions are delayed, so a round trip costs at least 2*d.
	if rtt < 2*d-10*time.Millisecond || rtt > 2*d+time.Second {
		t.Fatalf("round trip with latency %v took %v", d, rtt)
	}
	// A timeout shorter than the latency fails.
	if _, err := c.roundTrip("x", d/2); !isTimeout(err) {
		t.Fatalf("expected timeout, got %v", err)
	}

	p.Heal()
	c2 := dial(t, p.Addr())
	start = time.Now()
	mustEcho(t, c2, "fast")
	if rtt := time.Since(start); rtt > d {
		t.Fatalf("after Heal round trip took %v", rtt)
	}
}

func TestLatencyPipelines(t *testing.T) {
	p := newProxy(t)
	c := dial(t, p.Addr())
	const d = 100 * time.Millisecond
	p.SetLatency(d)
	// Five back-to-back lines must not cost 5 round trips of latency.
	start := time.Now()
	_ = c.c.SetDeadline(time.Now().Add(5 * time.Second))
	for i := 0; i < 5; i++ {
		if _, err := io.WriteString(c.c, "x\n"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	for i := 0; i < 5; i++ {
		if _, err := c.r.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	}
	if el := time.Since(start); el > 4*d {
		t.Fatalf("pipelined lines took %v; latency is serialised", el)
	}
}

func TestBlackhole(t *testing.T) {
	p := newProxy(t)
	old := dial(t, p.Addr())
	mustEcho(t, old, "before")

	p.Blackhole()
	// Existing connection: stays open, but nothing comes back.
	if _, err := old.roundTrip("lost", 200*time.Millisecond); !isTimeout(err) {
		t.Fatalf("existing conn during blackhole: want timeout, got %v", err)
	}
	// New connection: accepted, but hangs.
	nc := dial(t, p.Addr())
	if _, err := nc.roundTrip("lost too", 200*time.Millisecond); !isTimeout(err) {
		t.Fatalf("new conn during blackhole: want timeout, got %v", err)
	}

	p.Heal()
	// Hung connections are closed on Heal rather than resumed mid-stream.
	for name, c := range map[string]*client{"old": old, "new": nc} {
		_ = c.c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.r.ReadString('\n'); err == nil || isTimeout(err) {
			t.Fatalf("%s hung conn after Heal: want closed, got %v", name, err)
		}
	}
	// And new connections work again.
	mustEcho(t, dial(t, p.Addr()), "after")
}

func TestCut(t *testing.T) {
	p := newProxy(t)
	old := dial(t, p.Addr())
	mustEcho(t, old, "before")

	p.Cut()
	_ = old.c.SetReadDeadline(time.Now().Add(2 * time.Second))
	start := time.Now()
	if _, err := old.r.ReadString('\n'); err == nil || isTimeout(err) {
		t.Fatalf("existing conn after Cut: want closed, got %v", err)
	}
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Fatalf("existing conn noticed Cut only after %v", el)
	}
	// New connections are closed right away (dial may succeed, the first
	// read fails at once).
	if c, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		cl := &client{c: c, r: bufio.NewReader(c)}
		start := time.Now()
		if _, err := cl.roundTrip("x", 2*time.Second); err == nil || isTimeout(err) {
			t.Fatalf("new conn during Cut: want closed, got %v", err)
		}
		if el := time.Since(start); el > 500*time.Millisecond {
			t.Fatalf("new conn during Cut closed only after %v", el)
		}
		_ = c.Close()
	}

	p.Heal()
	mustEcho(t, dial(t, p.Addr()), "after")
}

func TestTargetDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	_ = ln.Close()
	p, err := New("127.0.0.1:0", dead)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// The proxy drops the client at once; on loopback the reset can even
	// beat the end of the client's connect.
	c, err := net.DialTimeout("tcp", p.Addr(), time.Second)
	if err != nil {
		return
	}
	defer c.Close()
	cl := &client{c: c, r: bufio.NewReader(c)}
	if _, err := cl.roundTrip("x", 2*time.Second); err == nil || isTimeout(err) {
		t.Fatalf("target down: want closed conn, got %v", err)
	}
}

func TestClose(t *testing.T) {
	p, err := New("127.0.0.1:0", startEcho(t))
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, p.Addr())
	mustEcho(t, c, "x")
	p.Blackhole()
	hung := dial(t, p.Addr())
	_ = hung
	done := make(chan error, 1)
	go func() { done <- p.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close hung")
	}
	if _, err := c.roundTrip("y", time.Second); err == nil || isTimeout(err) {
		t.Fatalf("conn after Close: want closed, got %v", err)
	}
	if c, err := net.DialTimeout("tcp", p.Addr(), 200*time.Millisecond); err == nil {
		_ = c.Close()
		t.Fatal("dial after Close succeeded")
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestConcurrentModeChanges flips modes while traffic flows, for the race
// detector: nothing may panic, deadlock or leak past Close.
func TestConcurrentModeChanges(t *testing.T) {
	p := newProxy(t)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", p.Addr(), time.Second)
				if err != nil {
					continue
				}
				cl := &client{c: c, r: bufio.NewReader(c)}
				_, _ = cl.roundTrip("ping", 50*time.Millisecond)
				_ = c.Close()
			}
		}()
	}
	for i := 0; i < 20; i++ {
		switch i % 4 {
		case 0:
			p.Blackhole()
		case 1:
			p.Cut()
		case 2:
			p.SetLatency(time.Millisecond)
		case 3:
			p.Heal()
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	p.Heal()
	mustEcho(t, dial(t, p.Addr()), "still works")
}
