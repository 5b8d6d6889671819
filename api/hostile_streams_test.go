package api_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Hostile clients (issue 16, part 4): streams that outlive their key, pile
// up, never send their request, or send a large one without a key.

func hostileEnv(t *testing.T, mod func(*api.ServerOptions), mods ...func(*tallytest.Options)) *tallytest.Env {
	t.Helper()
	return newAuthEnv(t, append(mods, func(o *tallytest.Options) { o.Server = mod })...)
}

// feedHead returns the feed's current end, so follow streams opened from it
// have no backlog to read.
func feedHead(t *testing.T, env *tallytest.Env) string {
	t.Helper()
	cursor, err := env.Client.Export(ctxT(t), "", false, func(*tallyv1.ExportTransfersResponse) error { return nil })
	if err != nil {
		t.Fatalf("export to the head: %v", err)
	}
	return cursor
}

type feedStream struct {
	stream tallyv1.LedgerService_ExportTransfersClient
	cancel context.CancelFunc
}

// openFollow opens a following ExportTransfers stream with key, without
// the client's retries.
func openFollow(t *testing.T, env *tallytest.Env, key, cursor string) feedStream {
	t.Helper()
	cl := env.Dial(t, key)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	s, err := cl.Raw().ExportTransfers(ctx, &tallyv1.ExportTransfersRequest{Cursor: cursor, Follow: true})
	if err != nil {
		t.Fatalf("open follow stream: %v", err)
	}
	return feedStream{stream: s, cancel: cancel}
}

// awaitTransfer reads s until transfer id arrives, or returns the stream's error.
func awaitTransfer(s feedStream, id string) error {
	for {
		ev, err := s.stream.Recv()
		if err != nil {
			return err
		}
		if ev.GetTransfer().GetTransferId() == id {
			return nil
		}
	}
}

// established proves every stream is being served: each delivers a new
// credit.
func established(t *testing.T, env *tallytest.Env, streams ...feedStream) {
	t.Helper()
	a := createAccount(t, env, newCurrency()).GetAccountId()
	id := credit(t, env, a, 10).GetTransfer().GetTransferId()
	for i, s := range streams {
		if err := awaitTransfer(s, id); err != nil {
			t.Fatalf("follow stream %d did not deliver a new transfer: %v", i, err)
		}
	}
}

// A stream opened before its key was revoked ends within the auth cache TTL
// with UNAUTHENTICATED; another key's stream goes on.
func TestHostileRevokedKeyStreamEnds(t *testing.T) {
	t.Parallel()
	const ttl = time.Second
	env := hostileEnv(t, nil, func(o *tallytest.Options) { o.AuthCacheTTL = ttl })
	head := feedHead(t, env)
	recon := env.NewKey(t, auth.RoleReconciler, "")
	other := env.NewKey(t, auth.RoleReconciler, "")
	doomed := openFollow(t, env, recon.Key.String(), head)
	kept := openFollow(t, env, other.Key.String(), head)
	established(t, env, doomed, kept)

	// As `tallyd keys revoke` does: only the database changes.
	if _, err := env.Store.RevokeAPIKey(context.Background(), recon.Key.ID); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	errc := make(chan error, 1)
	go func() {
		for {
			if _, err := doomed.stream.Recv(); err != nil {
				errc <- err
				return
			}
		}
	}()
	bound := ttl + 1500*time.Millisecond
	select {
	case err := <-errc:
		took := time.Since(revoked)
		wantErr(t, err, codes.Unauthenticated, api.ReasonUnauthenticated)
		if took > bound {
			t.Fatalf("stream ended %s after the revocation, want within %s", took, bound)
		}
		t.Logf("revoked key's stream ended after %s: %v", took.Round(time.Millisecond), err)
	case <-time.After(5 * time.Second):
		t.Fatalf("a follow stream of a key revoked 5s ago (auth cache TTL %s) is still open", ttl)
	}
	established(t, env, kept)
}

// A key cannot hold more following streams than the per-key cap: the next
// is RESOURCE_EXHAUSTED (retried by clients), other keys are unaffected and
// a closed stream frees its place.
func TestHostileFollowStreamCapPerKey(t *testing.T) {
	t.Parallel()
	const perKey = 3
	env := hostileEnv(t, func(o *api.ServerOptions) { o.ExportFollowStreamsPerKeyMax = perKey })
	head := feedHead(t, env)
	k := env.NewKey(t, auth.RoleReconciler, "").Key.String()
	var open []feedStream
	for range perKey {
		open = append(open, openFollow(t, env, k, head))
	}
	established(t, env, open...)
	over := openFollow(t, env, k, head)
	_, err := over.stream.Recv()
	wantErr(t, err, codes.ResourceExhausted, api.ReasonFollowStreamsExhausted)

	established(t, env, openFollow(t, env, env.NewKey(t, auth.RoleReconciler, "").Key.String(), head))

	open[0].cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		again := openFollow(t, env, k, head)
		done := make(chan error, 1)
		go func() { _, err := again.stream.Recv(); done <- err }()
		a := createAccount(t, env, newCurrency()).GetAccountId()
		credit(t, env, a, 1)
		if err := <-done; err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("after closing one of the key's streams a new one is still refused: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The server as a whole serves at most the per-server cap of following
// streams, whichever keys open them.
func TestHostileFollowStreamCapPerServer(t *testing.T) {
	t.Parallel()
	const max = 4
	env := hostileEnv(t, func(o *api.ServerOptions) { o.ExportFollowStreamsMax = max })
	head := feedHead(t, env)
	var open []feedStream
	for range max {
		open = append(open, openFollow(t, env, env.NewKey(t, auth.RoleReconciler, "").Key.String(), head))
	}
	established(t, env, open...)
	over := openFollow(t, env, env.NewKey(t, auth.RoleReconciler, "").Key.String(), head)
	_, err := over.stream.Recv()
	wantErr(t, err, codes.ResourceExhausted, api.ReasonFollowStreamsExhausted)
	// A non-following export is not capped.
	if _, err := env.Client.Export(ctxT(t), head, false, func(*tallyv1.ExportTransfersResponse) error { return nil }); err != nil {
		t.Fatalf("non-following export with the follow cap reached: %v", err)
	}
}

// Caught-up followers wait on one shared watcher: 40 idle followers cost
// about what one does (one feed query per poll interval), not 40 times it.
func TestHostileIdleFollowersDoNotQueryPostgres(t *testing.T) {
	t.Parallel()
	const n, poll, window = 40, 100 * time.Millisecond, 2 * time.Second
	env := hostileEnv(t, func(o *api.ServerOptions) {
		o.ExportPollInterval = poll
		o.ExportFollowStreamsPerKeyMax = n
	})
	head := feedHead(t, env)
	k := env.NewKey(t, auth.RoleReconciler, "").Key.String()
	var open []feedStream
	for range n {
		open = append(open, openFollow(t, env, k, head))
	}
	established(t, env, open...)
	time.Sleep(3 * poll) // let every follower settle into waiting
	before := env.Store.Pool().Stat().AcquireCount()
	time.Sleep(window)
	used := env.Store.Pool().Stat().AcquireCount() - before
	perStream := int64(window / poll) // what one polling stream alone costs
	t.Logf("%d idle followers: %d PostgreSQL connection acquisitions in %s (one poller: ~%d)", n, used, window, perStream)
	if used > 3*perStream {
		t.Fatalf("%d idle followers made %d pool acquisitions in %s; one shared poller makes about %d", n, used, window, perStream)
	}
}

// A stream that sends headers and no request message, or a message without
// ending its side, is closed after the request wait, without a key too, and
// never with INTERNAL or UNKNOWN.
func TestHostileSlowLorisClosed(t *testing.T) {
	t.Parallel()
	const wait = time.Second
	env := hostileEnv(t, func(o *api.ServerOptions) { o.RequestWaitMax = wait })
	conn := rawConn(t, env)
	admin := "Bearer " + env.AdminKey
	for _, c := range []struct {
		name, method, key string
		send              bool
	}{
		{"health, headers only", "/grpc.health.v1.Health/Check", "", false},
		{"GetAccount, headers only", tallyv1.LedgerService_GetAccount_FullMethodName, admin, false},
		{"GetAccount, message but no end of stream", tallyv1.LedgerService_GetAccount_FullMethodName, admin, true},
		{"ExportTransfers, headers only", tallyv1.LedgerService_ExportTransfers_FullMethodName, admin, false},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
		if c.key != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", c.key)
		}
		start := time.Now()
		s, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, c.method)
		if err != nil {
			cancel()
			t.Fatalf("%s: %v", c.name, err)
		}
		if c.send {
			if err := s.SendMsg(&tallyv1.GetAccountRequest{AccountId: "00000000-0000-0000-0000-000000000001"}); err != nil {
				t.Fatalf("%s: send: %v", c.name, err)
			}
		}
		var resp healthpb.HealthCheckResponse
		err = s.RecvMsg(&resp)
		took := time.Since(start)
		clientGaveUp := ctx.Err() != nil
		cancel()
		code := status.Code(err)
		t.Logf("%s: closed after %s with %v", c.name, took.Round(time.Millisecond), err)
		if clientGaveUp || took > wait+1500*time.Millisecond {
			t.Fatalf("%s: the server held the stream %s (request wait %s): %v", c.name, took, wait, err)
		}
		if code == codes.OK || code == codes.Internal || code == codes.Unknown {
			t.Fatalf("%s: got %v", c.name, err)
		}
	}
}

// Connections over the cap are closed at once; a freed slot is usable again.
func TestHostileConnectionCap(t *testing.T) {
	t.Parallel()
	const max = 3
	env := hostileEnv(t, func(o *api.ServerOptions) {
		o.ConnectionsMax = max
		o.RequestWaitMax = 15 * time.Second // idle raw connections are not closed by the handshake bound
	})
	var held []net.Conn
	for range max {
		c, err := net.Dial("tcp", env.Addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		held = append(held, c)
	}
	time.Sleep(200 * time.Millisecond) // the server has accepted them
	extra, err := net.Dial("tcp", env.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	_ = extra.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := extra.Read(make([]byte, 64)); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("connection %d of a cap of %d: read gave %v, want it closed by the server", max+1, max, err)
	}
	conn, err := grpc.NewClient(env.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{})
	cancel()
	if code := status.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
		t.Fatalf("health check over the connection cap: %v, want UNAVAILABLE", err)
	}
	_ = held[0].Close()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("health check after a slot was freed: %v", err)
	}
}

func isReset(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "broken pipe"))
}

// countingProxy forwards TCP to addr and counts the bytes clients send.
func countingProxy(t *testing.T, addr string) (string, *atomic.Int64) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lis.Close() })
	var n atomic.Int64
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", addr)
			if err != nil {
				_ = c.Close()
				continue
			}
			wg.Add(2)
			go func() {
				defer wg.Done()
				defer s.Close()
				buf := make([]byte, 32<<10)
				for {
					k, err := c.Read(buf)
					if k > 0 {
						n.Add(int64(k))
						if _, werr := s.Write(buf[:k]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
			go func() { defer wg.Done(); defer c.Close(); _, _ = io.Copy(c, s) }()
		}
	}()
	return lis.Addr().String(), &n
}

// A 3 MB request without a key is refused from its headers: the server does
// not read the body (the client gets to send at most a flow-control window
// of it), and health stays open.
func TestHostileUnauthenticatedLargeRequestNotRead(t *testing.T) {
	t.Parallel()
	env := hostileEnv(t, nil)
	addr, sent := countingProxy(t, env.Addr)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx := ctxT(t)
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health without a key: %v", err)
	}
	base := sent.Load()
	const size = 3 << 20
	big := &tallyv1.SubmitBatchRequest{BatchKey: strings.Repeat("x", size)}
	for _, key := range []string{"", "Bearer tly_made-up-key"} {
		cctx := ctx
		if key != "" {
			cctx = metadata.AppendToOutgoingContext(ctx, "authorization", key)
		}
		err = conn.Invoke(cctx, tallyv1.LedgerService_SubmitBatch_FullMethodName, big, &tallyv1.SubmitBatchResponse{})
		wantErr(t, err, codes.Unauthenticated, api.ReasonUnauthenticated)
	}
	time.Sleep(200 * time.Millisecond)
	got := sent.Load() - base
	t.Logf("two %d-byte requests without a valid key: %d bytes reached the server", size, got)
	if got > 512<<10 {
		t.Fatalf("the server read %d bytes of two unauthenticated %d-byte requests; it must refuse them from their headers", got, size)
	}

	// The open services take only small messages (the one place a body is
	// read before authentication): over the limit they are not decoded.
	hc := healthpb.NewHealthClient(conn)
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{Service: strings.Repeat("h", 1<<20)})
	wantErr(t, err, codes.InvalidArgument, api.ReasonMessageTooLarge)
	rs, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rs.Send(&reflectionpb.ServerReflectionRequest{Host: strings.Repeat("r", 1<<20),
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	_, err = rs.Recv()
	wantErr(t, err, codes.InvalidArgument, api.ReasonMessageTooLarge)
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("a small health check: %v", err)
	}
}

// Followers sharing the watcher's pages, opened at different points of a
// stream of writes, each see every transfer exactly once.
func TestHostileSharedWatcherFollowersSeeEveryTransferOnce(t *testing.T) {
	t.Parallel()
	env := hostileEnv(t, func(o *api.ServerOptions) { o.ExportPollInterval = 50 * time.Millisecond })
	head := feedHead(t, env)
	k := env.NewKey(t, auth.RoleReconciler, "").Key.String()
	a := createAccount(t, env, newCurrency()).GetAccountId()
	const followers, writes = 5, 60
	var ids []string
	seen := make([]map[string]int, followers)
	var mu sync.Mutex
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := range followers {
		seen[i] = map[string]int{}
		if i > 0 {
			for range writes / followers / 2 {
				ids = append(ids, credit(t, env, a, 1).GetTransfer().GetTransferId())
			}
		}
		s := openFollow(t, env, k, head) // every follower starts from the same cursor
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				ev, err := s.stream.Recv()
				if err != nil {
					return
				}
				if tr := ev.GetTransfer(); tr != nil && (tr.GetCreditAccountId() == a || tr.GetDebitAccountId() == a) {
					mu.Lock()
					seen[i][tr.GetTransferId()]++
					mu.Unlock()
				}
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
		defer s.cancel()
	}
	for len(ids) < writes {
		ids = append(ids, credit(t, env, a, 1).GetTransfer().GetTransferId())
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		mu.Lock()
		done := true
		for i := range seen {
			done = done && len(seen[i]) >= len(ids)
		}
		mu.Unlock()
		if done || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	mu.Lock()
	defer mu.Unlock()
	for i := range seen {
		for _, id := range ids {
			if seen[i][id] != 1 {
				t.Errorf("follower %d saw transfer %s %d times, want once", i, id, seen[i][id])
			}
		}
		if len(seen[i]) != len(ids) {
			t.Errorf("follower %d saw %d transfers of the account, %d committed", i, len(seen[i]), len(ids))
		}
	}
}
