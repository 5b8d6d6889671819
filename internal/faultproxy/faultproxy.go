// Package faultproxy is a small TCP proxy that injects network faults between
// a client and a server at runtime: added latency, a blackhole (bytes stop
// flowing but connections stay open, the way a partition looks to a client),
// and a cut (connections are reset and new ones are closed at once, the way a
// crashed or restarted peer looks).
//
// It exists so that tests can put a real dependency (Redis, PostgreSQL) behind
// a network that misbehaves on command, without root, iptables or tc. It is a
// test tool: it favours simple, predictable behaviour over throughput.
package faultproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// dialTimeout bounds the proxy's own connect to the target, so that a dead
// target turns into a closed client connection rather than a hung goroutine.
const dialTimeout = 5 * time.Second

// chunkSize is the largest read the proxy forwards as one chunk.
const chunkSize = 32 * 1024

// mode is what the proxy currently does with traffic.
type mode int

const (
	modePass mode = iota
	modeBlackhole
	modeCut
)

// Proxy forwards TCP connections from its listen address to a target address
// and injects faults into them. All methods are safe for concurrent use.
type Proxy struct {
	target string
	ln     net.Listener

	mu      sync.Mutex
	mode    mode
	latency time.Duration
	links   map[*link]struct{}
	closed  bool

	wg sync.WaitGroup
}

// link is one proxied client connection and, once dialed, its server side.
type link struct {
	client net.Conn
	done   chan struct{}
	once   sync.Once

	// The fields below are guarded by Proxy.mu.
	server net.Conn
	// tainted marks a link that lived through a blackhole: it may have had
	// bytes swallowed, so its byte stream can no longer be trusted and it is
	// closed on Heal instead of being resumed mid-stream.
	tainted bool
	// halves counts finished forwarding directions; the link closes at 2.
	halves int
}

// close tears both sides of the link down; it is idempotent.
func (l *link) close(abort bool) {
	l.once.Do(func() {
		close(l.done)
		if abort {
			setLinger0(l.client)
		}
		_ = l.client.Close()
	})
}

// New starts a proxy listening on listenAddr ("127.0.0.1:0" picks a free
// port) that forwards to targetAddr. It starts in pass-through mode. The
// target is dialed per accepted connection, so it need not be up yet.
func New(listenAddr, targetAddr string) (*Proxy, error) {
	ln, err := net.Listen("tcp", listenAddr)
	if err != nil {
		return nil, fmt.Errorf("faultproxy: listen %s: %w", listenAddr, err)
	}
	p := &Proxy{target: targetAddr, ln: ln, links: make(map[*link]struct{})}
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Addr is the address clients should dial instead of the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Heal clears every fault: no latency, traffic passes. Connections that lived
// through a blackhole are closed, because bytes may have been dropped in the
// middle of a protocol message; clients see an error and reconnect cleanly.
// Connections that only saw latency keep working.
func (p *Proxy) Heal() {
	p.mu.Lock()
	p.mode = modePass
	p.latency = 0
	var hung []*link
	for l := range p.links {
		if l.tainted {
			hung = append(hung, l)
		}
	}
	p.mu.Unlock()
	for _, l := range hung {
		p.closeLink(l, true)
	}
}

// Blackhole stops all forwarding in both directions. Existing connections
// stay open and new connections are accepted, but no byte gets through, so
// clients hang until their own timeouts fire: this is what a network
// partition or a frozen peer looks like.
func (p *Proxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = modeBlackhole
	for l := range p.links {
		l.tainted = true
	}
}

// Cut resets every current connection and closes new ones right after
// accepting them, until Heal: this is what a crashed peer looks like.
func (p *Proxy) Cut() {
	p.mu.Lock()
	p.mode = modeCut
	all := make([]*link, 0, len(p.links))
	for l := range p.links {
		all = append(all, l)
	}
	p.mu.Unlock()
	for _, l := range all {
		p.closeLink(l, true)
	}
}

// SetLatency delays every chunk forwarded in either direction by d, so a
// request/response round trip costs at least 2*d. Chunks keep their order and
// are pipelined (the delay is not serialised per chunk). Zero removes the
// delay for chunks read from now on. It does not change the current mode.
func (p *Proxy) SetLatency(d time.Duration) {
	if d < 0 {
		d = 0
	}
	p.mu.Lock()
	p.latency = d
	p.mu.Unlock()
}

// Close stops listening, closes every connection and waits for the proxy's
// goroutines to finish.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	all := make([]*link, 0, len(p.links))
	for l := range p.links {
		all = append(all, l)
	}
	p.mu.Unlock()
	err := p.ln.Close()
	for _, l := range all {
		p.closeLink(l, true)
	}
	p.wg.Wait()
	return err
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Transient accept errors (e.g. EMFILE): back off briefly.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		l := &link{client: c, done: make(chan struct{})}
		p.mu.Lock()
		if p.closed || p.mode == modeCut {
			p.mu.Unlock()
			l.close(true)
			continue
		}
		l.tainted = p.mode == modeBlackhole
		p.links[l] = struct{}{}
		p.mu.Unlock()
		p.wg.Add(1)
		go p.serve(l)
	}
}

// serve dials the target for l and starts forwarding. A link accepted during
// a blackhole never dials: it just hangs until Heal, Cut or Close drop it.
func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	if p.isTainted(l) {
		<-l.done
		return
	}
	// Abandon the dial if the link is dropped meanwhile (Cut, Close).
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	go func() {
		select {
		case <-l.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	var d net.Dialer
	s, err := d.DialContext(ctx, "tcp", p.target)
	cancel()
	if err != nil {
		p.closeLink(l, true)
		return
	}
	p.mu.Lock()
	select {
	case <-l.done:
		p.mu.Unlock()
		setLinger0(s)
		_ = s.Close()
		return
	default:
	}
	l.server = s
	p.mu.Unlock()

	p.wg.Add(2)
	go p.pipe(l, l.client, s)
	go p.pipe(l, s, l.client)
}

type chunk struct {
	data []byte
	due  time.Time
}

// pipe forwards src to dst for one direction of l. A reader goroutine stamps
// each chunk with its due time so latency delays but does not serialise.
func (p *Proxy) pipe(l *link, src, dst net.Conn) {
	defer p.wg.Done()
	ch := make(chan chunk, 64)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer close(ch)
		for {
			buf := make([]byte, chunkSize)
			n, err := src.Read(buf)
			if n > 0 {
				p.mu.Lock()
				due := time.Now().Add(p.latency)
				p.mu.Unlock()
				select {
				case ch <- chunk{data: buf[:n], due: due}:
				case <-l.done:
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()

	var timer *time.Timer
	for c := range ch {
		if wait := time.Until(c.due); wait > 0 {
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			select {
			case <-timer.C:
			case <-l.done:
				return
			}
		}
		if p.isTainted(l) {
			// Blackholed: swallow everything until the link is dropped.
			<-l.done
			return
		}
		if _, err := dst.Write(c.data); err != nil {
			p.closeLink(l, true)
			return
		}
	}
	// src reached EOF (or failed): pass the half-close on, and drop the link
	// once both directions are finished.
	if tc, ok := dst.(interface{ CloseWrite() error }); ok {
		_ = tc.CloseWrite()
	}
	p.mu.Lock()
	l.halves++
	both := l.halves == 2
	p.mu.Unlock()
	if both {
		p.closeLink(l, false)
	}
}

func (p *Proxy) isTainted(l *link) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return l.tainted
}

// closeLink drops l from the proxy and closes both of its sides. abort resets
// the connections (RST) instead of closing them gracefully, so clients notice
// at once.
func (p *Proxy) closeLink(l *link, abort bool) {
	// Close done before reading server: serve publishes server only while
	// done is still open (checked under mu), so one of the two always closes
	// the server side.
	l.close(abort)
	p.mu.Lock()
	delete(p.links, l)
	s := l.server
	p.mu.Unlock()
	if s != nil {
		if abort {
			setLinger0(s)
		}
		_ = s.Close()
	}
}

// setLinger0 makes Close send a RST instead of a FIN.
func setLinger0(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
}

var _ io.Closer = (*Proxy)(nil)
