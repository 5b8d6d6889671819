package stripetest

import (
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

func post(t *testing.T, s *Server, key string, form url.Values) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, s.URL+"/v1/payment_intents", strings.NewReader(form.Encode()))
	req.Header.Set("Authorization", "Bearer sk_test_x")
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Idempotency-Key", key)
	// No connection reuse: net/http resends a request with an
	// Idempotency-Key by itself when a reused connection drops.
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func intent(pm string) url.Values {
	return url.Values{"amount": {"500"}, "currency": {"usd"}, "customer": {"cus_1"}, "payment_method": {pm},
		"confirm": {"true"}, "off_session": {"true"}, "metadata[tally_topup_id]": {"t1"}}
}

// Stripe's idempotency: the same key and parameters get the stored
// response, whatever it was (a 500 included), and record nothing more;
// other parameters under the key are an idempotency_error.
func TestIdempotencyAndFaults(t *testing.T) {
	s, err := Start("")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.InjectFaults(Fault500AfterRecord)
	code, body := post(t, s, "k1", intent("pm_card_visa"))
	if code != 500 || len(s.PaymentIntents()) != 1 || s.PaymentIntents()[0].Status != "succeeded" {
		t.Fatalf("first: %d %s, %d intents", code, body, len(s.PaymentIntents()))
	}
	if code2, body2 := post(t, s, "k1", intent("pm_card_visa")); code2 != 500 || body2 != body {
		t.Fatalf("replay: %d %s, want the stored 500", code2, body2)
	}
	if code, body := post(t, s, "k1", intent("pm_other")); code != 400 || !strings.Contains(body, "idempotency_error") {
		t.Fatalf("other parameters: %d %s", code, body)
	}
	s.InjectFaults(FaultDropAfterRecord)
	if code, _ := post(t, s, "k2", intent("pm_card_visa")); code != 0 {
		t.Fatalf("drop: answered %d", code)
	}
	if code, body := post(t, s, "k2", intent("pm_card_visa")); code != 200 || !strings.Contains(body, `"succeeded"`) {
		t.Fatalf("after a drop, the key replays the recorded payment: %d %s", code, body)
	}
	if code, body := post(t, s, "k3", intent("pm_card_chargeDeclined")); code != 402 || !strings.Contains(body, "card_error") {
		t.Fatalf("decline: %d %s", code, body)
	}
	if n := len(s.PaymentIntents()); n != 3 || s.Creates() != 6 {
		t.Fatalf("%d intents from %d creates, want 3 from 6", n, s.Creates())
	}
	if len(s.Succeeded("t1")) != 2 {
		t.Fatalf("succeeded for t1: %v", s.Succeeded("t1"))
	}
}
