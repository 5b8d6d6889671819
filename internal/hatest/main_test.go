package hatest

import (
	"os"
	"testing"

	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
)

// dbURL is this package's database on the shared test PostgreSQL (for tests
// that fail over Redis only).
var dbURL string

func TestMain(m *testing.M) {
	os.Exit(testdb.Main(m, tallytest.DBOptions(), func(db *testdb.DB) { dbURL = db.URL() }))
}
