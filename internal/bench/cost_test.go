package bench

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// statLine is a /proc/<pid>/stat line with the given ppid, utime, stime,
// cutime and cstime (in clock ticks) and a command name with spaces and a
// parenthesis, as a process can choose.
func statLine(ppid, ut, st, cut, cst int) string {
	return "4242 (postgres: x) y) S " + strconv.Itoa(ppid) + " 4242 4242 0 -1 4194560 100 0 0 0 " +
		strconv.Itoa(ut) + " " + strconv.Itoa(st) + " " + strconv.Itoa(cut) + " " + strconv.Itoa(cst) +
		" 20 0 1 0 12345 1000000 500 18446744073709551615\n"
}

func TestParseProcStat(t *testing.T) {
	s, err := parseProcStat([]byte(statLine(7, 150, 50, 1000, 1)))
	if err != nil {
		t.Fatal(err)
	}
	want := procStat{PPID: 7, CPU: 2 * time.Second, ChildCPU: 10010 * time.Millisecond}
	if s != want {
		t.Fatalf("parseProcStat = %+v, want %+v", s, want)
	}
	for _, bad := range []string{"", "1 (x S 1 2", "1 (x) S 1 2 3", "1 (x) S 1 2 3 4 5 6 7 8 9 10 zz 12 13 14 15"} {
		if _, err := parseProcStat([]byte(bad)); err == nil {
			t.Errorf("parseProcStat(%q) accepted", bad)
		}
	}
}

// fakeProc writes root/<pid>/stat for each process.
func fakeProc(t *testing.T, procs map[int]string) string {
	t.Helper()
	root := t.TempDir()
	for pid, line := range procs {
		dir := filepath.Join(root, strconv.Itoa(pid))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(line), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "self"), 0o755); err != nil { // not a pid
		t.Fatal(err)
	}
	return root
}

func TestTreeCPU(t *testing.T) {
	root := fakeProc(t, map[int]string{
		10: statLine(1, 10, 10, 100, 100), // postmaster: 20 own + 200 of ended children
		11: statLine(10, 30, 20, 0, 0),    // a backend: 50
		12: statLine(10, 5, 0, 0, 0),      // the checkpointer: 5
		13: statLine(11, 999, 0, 0, 0),    // a grandchild: not counted
		20: statLine(1, 999, 0, 0, 0),     // another process
	})
	got, err := treeCPU(root, 10)
	if err != nil {
		t.Fatal(err)
	}
	if want := 275 * 10 * time.Millisecond; got != want {
		t.Fatalf("treeCPU = %v, want %v", got, want)
	}
	if _, err := treeCPU(root, 99); err == nil {
		t.Fatal("treeCPU of a missing pid succeeded")
	}
	cpu := cpuOf(root, []int{11, 12, 99})
	if len(cpu) != 2 || cpu[11] != 500*time.Millisecond || cpu[12] != 50*time.Millisecond {
		t.Fatalf("cpuOf = %v", cpu)
	}
}

func TestCPUDelta(t *testing.T) {
	before := map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: time.Second}
	after := map[int]time.Duration{1: 3 * time.Second, 2: 2 * time.Second, 4: 500 * time.Millisecond}
	// pid 1 used 2s, pid 2 nothing, pid 3 ended (lost), pid 4 started: 0.5s.
	if got := cpuDelta(before, after); got != 2500*time.Millisecond {
		t.Fatalf("cpuDelta = %v", got)
	}
}

func TestPerOpMicros(t *testing.T) {
	if got := perOpMicros(3*time.Second, 1000); got != 3000 {
		t.Fatalf("perOpMicros = %v, want 3000", got)
	}
	if got := perOpMicros(time.Second, 0); got != 0 {
		t.Fatalf("perOpMicros with no ops = %v", got)
	}
}

const promText = `# HELP tally_batch_size_items Calls group-committed per PostgreSQL transaction.
# TYPE tally_batch_size_items histogram
tally_batch_size_items_bucket{le="1"} 3
tally_batch_size_items_bucket{le="+Inf"} 40
tally_batch_size_items_sum 680
tally_batch_size_items_count 40
tally_batch_size_items_other 1
go_gc_duration_seconds_sum 0.5
go_gc_duration_seconds_count 12
`

func TestParsePromHist(t *testing.T) {
	h, found, err := parsePromHist(strings.NewReader(promText), BatchSizeMetric)
	if err != nil || !found {
		t.Fatalf("parsePromHist: found %v, %v", found, err)
	}
	if h != (promHist{Sum: 680, Count: 40}) {
		t.Fatalf("parsePromHist = %+v", h)
	}
	if _, found, _ := parsePromHist(strings.NewReader(promText), "tally_nope"); found {
		t.Fatal("absent histogram found")
	}
	if _, _, err := parsePromHist(strings.NewReader("tally_batch_size_items_sum x\n"), BatchSizeMetric); err == nil {
		t.Fatal("bad value accepted")
	}
}

func TestMeanDelta(t *testing.T) {
	a, b := promHist{Sum: 100, Count: 40}, promHist{Sum: 100 + 1700, Count: 140} // 17 each since a; 12.9 since start
	if got := meanDelta(a, b); got != 17 {
		t.Fatalf("meanDelta = %v, want 17", got)
	}
	if got := meanDelta(b, b); got != 0 {
		t.Fatalf("meanDelta with no batches = %v", got)
	}
}

func TestSeqScanDelta(t *testing.T) {
	a := map[string]SeqScan{"accounts": {Scans: 5, TupRead: 50}, "entries": {Scans: 1, TupRead: 0}}
	b := map[string]SeqScan{"accounts": {Scans: 7, TupRead: 70}, "entries": {Scans: 1, TupRead: 0}, "holds": {Scans: 1, TupRead: 3}}
	got := seqScanDelta(a, b)
	if len(got) != 2 || got["accounts"] != (SeqScan{2, 20}) || got["holds"] != (SeqScan{1, 3}) {
		t.Fatalf("seqScanDelta = %v", got)
	}
}

func TestWindowCost(t *testing.T) {
	w := window{d: 2 * time.Second, ops: 1000}
	w.clientCPU = [2]time.Duration{time.Second, 1500 * time.Millisecond}
	w.server[0] = serverSample{cpu: time.Second, cpuOK: true, hist: promHist{Sum: 10, Count: 1}, histOK: true}
	w.server[1] = serverSample{cpu: 2 * time.Second, cpuOK: true, hist: promHist{Sum: 1010, Count: 51}, histOK: true}
	w.pg[0] = pgSample{ok: true, commits: 100, backends: map[int]time.Duration{1: 0}, server: time.Second, serverOK: true}
	w.pg[1] = pgSample{ok: true, commits: 200, backends: map[int]time.Duration{1: 400 * time.Millisecond}, server: 4 * time.Second, serverOK: true}
	c := w.cost()
	check := func(name string, got *float64, want float64) {
		t.Helper()
		if got == nil {
			t.Errorf("%s unknown, want %v", name, want)
		} else if math.Abs(*got-want) > 1e-9 {
			t.Errorf("%s = %v, want %v", name, *got, want)
		}
	}
	check("tallyd µs/op", c.TallydCPUUsPerOp, 1000)
	check("client µs/op", c.ClientCPUUsPerOp, 500)
	check("pg backends µs/op", c.PGBackendsCPUUsPerOp, 400)
	check("pg server µs/op", c.PGServerCPUUsPerOp, 3000)
	check("items/batch", c.ItemsPerBatch, 20)
	check("batches", c.Batches, 50)
	check("commits/s", c.CommitsPerS, 50)
	if c.Commits == nil || *c.Commits != 100 {
		t.Errorf("commits = %v", c.Commits)
	}
	// Batches seen but none made (reads): no mean.
	w.server[1].hist = w.server[0].hist
	if c := w.cost(); c.ItemsPerBatch != nil || c.Batches == nil || *c.Batches != 0 {
		t.Errorf("no batches: items/batch %v, batches %v", c.ItemsPerBatch, c.Batches)
	}
	// Nothing seen: every figure but the client's is unknown.
	c = window{d: time.Second, ops: 1}.cost()
	if c.TallydCPUUsPerOp != nil || c.PGBackendsCPUUsPerOp != nil || c.ItemsPerBatch != nil || c.CommitsPerS != nil {
		t.Errorf("unknown figures reported: %+v", c)
	}
	var out bytes.Buffer
	printCost(&out, c)
	if !strings.Contains(out.String(), "tallyd ?") || !strings.Contains(out.String(), "pass --database-url") {
		t.Errorf("printCost of unknown figures:\n%s", out.String())
	}
}

func TestLoadAvg1(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "loadavg"), []byte("1.73 0.50 0.25 2/300 999\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := loadAvg1(root); got != 1.73 {
		t.Fatalf("loadAvg1 = %v", got)
	}
	if got := loadAvg1(filepath.Join(root, "none")); got != 0 {
		t.Fatalf("loadAvg1 without the file = %v", got)
	}
}
