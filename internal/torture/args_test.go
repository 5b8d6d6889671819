package torture

import (
	"reflect"
	"testing"
)

func TestFilterArgs(t *testing.T) {
	args := []string{"serve", "--database-url", "postgres://x", "--hold-sweep-interval", "2s", "--log-level", "warn", "--new-bool", "--grpc-addr", "a:1"}
	kept, dropped := filterArgs(args, map[string]bool{"database-url": true, "log-level": true, "grpc-addr": true})
	wantKept := []string{"serve", "--database-url", "postgres://x", "--log-level", "warn", "--grpc-addr", "a:1"}
	if !reflect.DeepEqual(kept, wantKept) || !reflect.DeepEqual(dropped, []string{"--hold-sweep-interval", "--new-bool"}) {
		t.Fatalf("kept %v dropped %v", kept, dropped)
	}
}
