//go:build unix && !linux

package localsvc

import (
	"errors"
	"syscall"
)

// sysProcAttr puts the child in its own process group. Parent-death signals
// are Linux-only, so elsewhere a killed parent can leak servers.
func sysProcAttr(cred *syscall.Credential, _ syscall.Signal) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: cred}
}

// dirProcs would find server processes by working directory; without
// /proc it finds none, leaving stale-process detection to postgres itself.
func dirProcs(string) []int { return nil }

// pidAlive reports whether pid exists.
func pidAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
