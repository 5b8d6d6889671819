package api_test

import (
	"os"
	"testing"

	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
)

// dbURL is this package's own database, cloned from the migrated template.
var dbURL string

func TestMain(m *testing.M) {
	os.Exit(testdb.Main(m, tallytest.DBOptions(), func(db *testdb.DB) { dbURL = db.URL() }))
}
