// Package stripetest is a Stripe-compatible test server for the calls
// tallyd's top-up worker makes: create, retrieve and list PaymentIntents.
// It keeps Stripe's idempotency semantics (the same Idempotency-Key with
// the same parameters gets the stored response, whatever it was, a 500
// included; the same key with other parameters is an idempotency_error),
// declines by payment method, and injectable faults that happen after the
// payment was recorded: answer 500, hang, drop the connection; or be slow.
// It records every PaymentIntent so tests can count them.
package stripetest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Fault is something the server does to a create request after it has
// recorded the payment (FaultSlow: before handling it).
type Fault int

// Faults.
const (
	// FaultNone handles the request normally.
	FaultNone Fault = iota
	// Fault500AfterRecord records the payment, stores a 500 as the key's
	// response (as Stripe does) and answers it.
	Fault500AfterRecord
	// FaultHangAfterRecord records the payment and its response, then
	// never answers (until the client gives up or the server closes).
	FaultHangAfterRecord
	// FaultDropAfterRecord records the payment and its response, then
	// closes the connection without answering.
	FaultDropAfterRecord
	// FaultSlow waits Server.SlowDelay, then handles the request.
	FaultSlow
)

// String names a fault (for torture reports).
func (f Fault) String() string {
	return [...]string{"none", "500_after_record", "hang_after_record", "drop_after_record", "slow"}[f]
}

// PaymentIntent is the subset of Stripe's PaymentIntent the server keeps.
type PaymentIntent struct {
	ID               string            `json:"id"`
	Object           string            `json:"object"`
	Amount           int64             `json:"amount"`
	AmountReceived   int64             `json:"amount_received"`
	Currency         string            `json:"currency"`
	Customer         string            `json:"customer"`
	PaymentMethod    string            `json:"payment_method"`
	Status           string            `json:"status"`
	Metadata         map[string]string `json:"metadata"`
	Created          int64             `json:"created"`
	Livemode         bool              `json:"livemode"`
	Confirm          bool              `json:"-"`
	OffSession       bool              `json:"-"`
	LastPaymentError *apiError         `json:"last_payment_error"`
	// IdempotencyKey is the key that created it (not part of Stripe's object).
	IdempotencyKey string `json:"-"`
}

type apiError struct {
	Type          string         `json:"type"`
	Code          string         `json:"code,omitempty"`
	DeclineCode   string         `json:"decline_code,omitempty"`
	Message       string         `json:"message"`
	Param         string         `json:"param,omitempty"`
	PaymentIntent *PaymentIntent `json:"payment_intent,omitempty"`
}

type stored struct {
	paramsHash string
	status     int
	body       []byte
	// inFlight: the first request of the key is still being handled.
	inFlight bool
}

// Server is a running test server.
type Server struct {
	// URL is the base URL to give stripe-go (tallyd --stripe-api-url).
	URL string
	// SlowDelay is FaultSlow's delay (default 2s).
	SlowDelay time.Duration
	// OnRecord, when set, is called with every PaymentIntent just after it
	// is recorded and before the response is sent (a test kills the client
	// there: paid, and the client never learns it).
	OnRecord func(PaymentIntent)

	mu       sync.Mutex
	intents  []*PaymentIntent
	byID     map[string]*PaymentIntent
	keys     map[string]*stored
	declines map[string]string
	faults   []Fault
	always   Fault
	creates  int
	seq      int
	hs       *http.Server
	lis      net.Listener
	closed   chan struct{}
}

// Start runs a server on 127.0.0.1 (addr "" picks a free port).
func Start(addr string) (*Server, error) {
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &Server{
		URL: "http://" + lis.Addr().String(), SlowDelay: 2 * time.Second,
		byID: map[string]*PaymentIntent{}, keys: map[string]*stored{}, declines: map[string]string{},
		lis: lis, closed: make(chan struct{}),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/payment_intents", s.create)
	mux.HandleFunc("GET /v1/payment_intents", s.list)
	mux.HandleFunc("GET /v1/payment_intents/{id}", s.retrieve)
	s.hs = &http.Server{Handler: s.auth(mux), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = s.hs.Serve(lis) }()
	return s, nil
}

// Close stops the server; hanging requests end.
func (s *Server) Close() {
	s.mu.Lock()
	select {
	case <-s.closed:
	default:
		close(s.closed)
	}
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = s.hs.Shutdown(ctx)
	_ = s.hs.Close()
}

// Decline makes every payment with this payment method decline with code
// (a card_error, Stripe's decline_code). Payment methods whose id contains
// "Declined" (pm_card_chargeDeclined) decline with generic_decline anyway.
func (s *Server) Decline(paymentMethod, code string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.declines[paymentMethod] = code
}

// InjectFaults makes the next create requests suffer these faults, one
// each, in order.
func (s *Server) InjectFaults(fs ...Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, fs...)
}

// SetFault makes every create request suffer f (FaultNone: none), after
// the queued ones of InjectFaults.
func (s *Server) SetFault(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.always = f
}

// PaymentIntents returns a copy of every PaymentIntent recorded, oldest first.
func (s *Server) PaymentIntents() []PaymentIntent {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]PaymentIntent, len(s.intents))
	for i, p := range s.intents {
		out[i] = *p
	}
	return out
}

// Succeeded returns the succeeded PaymentIntents whose
// metadata[tally_topup_id] is id.
func (s *Server) Succeeded(topupID string) []PaymentIntent {
	var out []PaymentIntent
	for _, p := range s.PaymentIntents() {
		if p.Status == "succeeded" && p.Metadata["tally_topup_id"] == topupID {
			out = append(out, p)
		}
	}
	return out
}

// Creates counts create requests received (replays included).
func (s *Server) Creates() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.creates
}

func (s *Server) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || key == "" {
			writeJSON(w, http.StatusUnauthorized, map[string]any{"error": apiError{Type: "invalid_request_error",
				Message: "You did not provide an API key."}})
			return
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	writeRaw(w, status, b)
}

func writeRaw(w http.ResponseWriter, status int, b []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Request-Id", "req_test")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func invalidRequest(param, msg string) map[string]any {
	return map[string]any{"error": apiError{Type: "invalid_request_error", Param: param, Message: msg}}
}

// hashParams hashes the form parameters in a canonical order.
func hashParams(v url.Values) string {
	keys := make([]string, 0, len(v))
	for k := range v {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	for _, k := range keys {
		for _, x := range v[k] {
			fmt.Fprintf(h, "%d:%s%d:%s", len(k), k, len(x), x)
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

func (s *Server) nextFault() Fault {
	if len(s.faults) > 0 {
		f := s.faults[0]
		s.faults = s.faults[1:]
		return f
	}
	return s.always
}

func (s *Server) create(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		writeJSON(w, http.StatusBadRequest, invalidRequest("", "malformed body"))
		return
	}
	form := r.PostForm
	key := r.Header.Get("Idempotency-Key")
	s.mu.Lock()
	s.creates++
	if st, ok := s.keys[key]; ok && key != "" {
		s.mu.Unlock()
		if st.inFlight {
			writeJSON(w, http.StatusConflict, map[string]any{"error": apiError{Type: "idempotency_error",
				Code: "idempotency_key_in_use", Message: "There is currently another in-progress request using this Idempotent Key."}})
			return
		}
		if st.paramsHash != hashParams(form) {
			writeJSON(w, http.StatusBadRequest, map[string]any{"error": apiError{Type: "idempotency_error",
				Message: "Keys for idempotent requests can only be used with the same parameters they were first used with."}})
			return
		}
		w.Header().Set("Idempotent-Replayed", "true")
		writeRaw(w, st.status, st.body)
		return
	}
	fault := s.nextFault()
	if key != "" {
		s.keys[key] = &stored{paramsHash: hashParams(form), inFlight: true}
	}
	s.mu.Unlock()
	forget := func() {
		s.mu.Lock()
		delete(s.keys, key)
		s.mu.Unlock()
	}
	if fault == FaultSlow {
		select {
		case <-time.After(s.SlowDelay):
		case <-r.Context().Done():
			forget()
			return
		case <-s.closed:
			forget()
			return
		}
	}
	pi, status, body, bad := s.record(form, key)
	if bad != nil {
		forget()
		writeJSON(w, http.StatusBadRequest, bad) // validation errors are not stored (as Stripe)
		return
	}
	if s.OnRecord != nil {
		s.OnRecord(*pi)
	}
	if fault == Fault500AfterRecord {
		status = http.StatusInternalServerError
		body, _ = json.Marshal(map[string]any{"error": apiError{Type: "api_error",
			Message: "An unknown error occurred (injected after the payment " + pi.ID + " was recorded)."}})
	}
	if key != "" {
		s.mu.Lock()
		s.keys[key] = &stored{paramsHash: hashParams(form), status: status, body: body}
		s.mu.Unlock()
	}
	switch fault {
	case FaultHangAfterRecord:
		select {
		case <-r.Context().Done():
		case <-s.closed:
		}
		return
	case FaultDropAfterRecord:
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				_ = conn.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	writeRaw(w, status, body)
}

// record validates a create request and records its PaymentIntent. It
// returns the response to store under the key, or a validation error.
func (s *Server) record(form url.Values, key string) (*PaymentIntent, int, []byte, map[string]any) {
	amount, err := strconv.ParseInt(form.Get("amount"), 10, 64)
	if err != nil || amount <= 0 {
		return nil, 0, nil, invalidRequest("amount", "amount must be a positive integer")
	}
	cur := form.Get("currency")
	if len(cur) != 3 || strings.ToLower(cur) != cur {
		return nil, 0, nil, invalidRequest("currency", "currency must be a three-letter lower-case ISO code")
	}
	for _, p := range []string{"customer", "payment_method"} {
		if form.Get(p) == "" {
			return nil, 0, nil, invalidRequest(p, p+" is required for an off-session payment")
		}
	}
	pi := &PaymentIntent{
		Object: "payment_intent", Amount: amount, Currency: cur, Customer: form.Get("customer"),
		PaymentMethod: form.Get("payment_method"), Metadata: map[string]string{},
		Confirm: form.Get("confirm") == "true", OffSession: form.Get("off_session") == "true", IdempotencyKey: key,
		Created: time.Now().Unix(),
	}
	for k, v := range form {
		if name, ok := strings.CutPrefix(k, "metadata["); ok && strings.HasSuffix(name, "]") && len(v) > 0 {
			pi.Metadata[strings.TrimSuffix(name, "]")] = v[0]
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	pi.ID = fmt.Sprintf("pi_test%08d", s.seq)
	code, declined := s.declines[pi.PaymentMethod]
	if !declined && strings.Contains(pi.PaymentMethod, "Declined") {
		code, declined = "generic_decline", true
	}
	switch {
	case !pi.Confirm:
		pi.Status = "requires_confirmation"
	case declined:
		pi.Status = "requires_payment_method"
		pi.LastPaymentError = &apiError{Type: "card_error", Code: "card_declined", DeclineCode: code, Message: "Your card was declined."}
	default:
		pi.Status, pi.AmountReceived = "succeeded", amount
	}
	s.intents = append(s.intents, pi)
	s.byID[pi.ID] = pi
	snapshot := *pi
	if declined && pi.Confirm {
		e := *pi.LastPaymentError
		e.PaymentIntent = &snapshot
		b, _ := json.Marshal(map[string]any{"error": e})
		return pi, http.StatusPaymentRequired, b, nil
	}
	b, _ := json.Marshal(snapshot)
	return pi, http.StatusOK, b, nil
}

func (s *Server) retrieve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	pi, ok := s.byID[r.PathValue("id")]
	var snap PaymentIntent
	if ok {
		snap = *pi
	}
	s.mu.Unlock()
	if !ok {
		writeJSON(w, http.StatusNotFound, invalidRequest("intent", "No such payment_intent"))
		return
	}
	writeJSON(w, http.StatusOK, snap)
}

// list answers GET /v1/payment_intents: newest first, filtered by customer
// and created[gte]/created[lte], paged by limit and starting_after.
func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := 10
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 100 {
			writeJSON(w, http.StatusBadRequest, invalidRequest("limit", "limit must be between 1 and 100"))
			return
		}
		limit = n
	}
	gte, _ := strconv.ParseInt(q.Get("created[gte]"), 10, 64)
	lte, _ := strconv.ParseInt(q.Get("created[lte]"), 10, 64)
	if lt, err := strconv.ParseInt(q.Get("created[lt]"), 10, 64); err == nil && (lte == 0 || lt-1 < lte) {
		lte = lt - 1
	}
	s.mu.Lock()
	var all []PaymentIntent
	for i := len(s.intents) - 1; i >= 0; i-- {
		p := s.intents[i]
		if (q.Get("customer") == "" || p.Customer == q.Get("customer")) && (gte == 0 || p.Created >= gte) && (lte == 0 || p.Created <= lte) {
			all = append(all, *p)
		}
	}
	s.mu.Unlock()
	if after := q.Get("starting_after"); after != "" {
		for i, p := range all {
			if p.ID == after {
				all = all[i+1:]
				break
			}
		}
	}
	more := len(all) > limit
	if more {
		all = all[:limit]
	}
	if all == nil {
		all = []PaymentIntent{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": all, "has_more": more, "url": "/v1/payment_intents"})
}
