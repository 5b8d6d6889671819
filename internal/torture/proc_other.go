//go:build unix && !linux

package torture

import "syscall"

// childProcAttr puts a tallyd in its own process group. Parent-death
// signals are Linux-only, so elsewhere a killed run can leak tallyds.
func childProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
