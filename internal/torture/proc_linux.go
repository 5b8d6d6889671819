//go:build linux

package torture

import "syscall"

// childProcAttr puts a tallyd in its own process group (a terminal's ^C
// reaches only tally-torture, which then shuts everything down in order)
// and has the kernel SIGKILL it if tally-torture itself dies, so no tallyd
// outlives a crashed run.
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
