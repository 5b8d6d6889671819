package bench

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, which Linux fixes at 100 for /proc/<pid>/stat.
const clockTicks = 100

// procStat is what the bench reads of /proc/<pid>/stat.
type procStat struct {
	PPID int
	// CPU is utime+stime: the process's own CPU time.
	CPU time.Duration
	// ChildCPU is cutime+cstime: the CPU time of its children that ended
	// and were waited for.
	ChildCPU time.Duration
}

// parseProcStat parses the contents of /proc/<pid>/stat.
func parseProcStat(b []byte) (procStat, error) {
	// The command name (field 2) may hold spaces and parentheses; the fields
	// after it start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), so field n is f[n-3]: ppid 4, utime 14,
	// stime 15, cutime 16, cstime 17.
	if len(f) < 15 {
		return procStat{}, fmt.Errorf("%d fields after the command name, want at least 15", len(f))
	}
	var v [5]int64
	for k, n := range []int{4, 14, 15, 16, 17} {
		x, err := strconv.ParseInt(f[n-3], 10, 64)
		if err != nil {
			return procStat{}, fmt.Errorf("field %d: %w", n, err)
		}
		v[k] = x
	}
	return procStat{PPID: int(v[0]), CPU: ticks(v[1] + v[2]), ChildCPU: ticks(v[3] + v[4])}, nil
}

func ticks(n int64) time.Duration { return time.Duration(n) * time.Second / clockTicks }

// readProcStat reads root/<pid>/stat (root is "/proc" outside tests).
func readProcStat(root string, pid int) (procStat, error) {
	b, err := os.ReadFile(filepath.Join(root, strconv.Itoa(pid), "stat"))
	if err != nil {
		return procStat{}, err
	}
	s, err := parseProcStat(b)
	if err != nil {
		return procStat{}, fmt.Errorf("%s/%d/stat: %w", root, pid, err)
	}
	return s, nil
}

// treeCPU is the CPU time a process and all its children ever used: its
// own, that of its ended (waited-for) children, and that of its live
// children. The difference of two readings is what the tree used in
// between, children that started or ended in between included (a child of
// a child that ends unwaited is the one thing it misses).
func treeCPU(root string, pid int) (time.Duration, error) {
	p, err := readProcStat(root, pid)
	if err != nil {
		return 0, err
	}
	total := p.CPU + p.ChildCPU
	ents, err := os.ReadDir(root)
	if err != nil {
		return 0, err
	}
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil || child == pid {
			continue
		}
		c, err := readProcStat(root, child)
		if err != nil || c.PPID != pid {
			continue // not a child, or it ended while we looked
		}
		total += c.CPU
	}
	return total, nil
}

// cpuOf reads the CPU time of each pid; pids that cannot be read (ended)
// are left out.
func cpuOf(root string, pids []int) map[int]time.Duration {
	out := make(map[int]time.Duration, len(pids))
	for _, pid := range pids {
		if s, err := readProcStat(root, pid); err == nil {
			out[pid] = s.CPU
		}
	}
	return out
}

// cpuDelta is the CPU the processes of after used since before: a process
// absent from before started in between and counts whole. Processes that
// ended in between are lost (their time is not readable any more).
func cpuDelta(before, after map[int]time.Duration) time.Duration {
	var d time.Duration
	for pid, a := range after {
		d += a - before[pid]
	}
	return d
}

// perOpMicros is d spread over ops operations, in microseconds (0 when no
// operation completed).
func perOpMicros(d time.Duration, ops int64) float64 {
	if ops <= 0 {
		return 0
	}
	return float64(d) / float64(time.Microsecond) / float64(ops)
}

// loadAvg1 is the 1-minute load average in root/loadavg (0 when unknown).
func loadAvg1(root string) float64 {
	b, err := os.ReadFile(filepath.Join(root, "loadavg"))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}
