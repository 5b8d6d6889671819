//go:build linux

package localsvc

import (
	"bytes"
	"os"
	"strconv"
	"syscall"
)

// sysProcAttr puts the child in its own process group (so a terminal's ^C
// reaches only us, and we decide how the server shuts down) and asks the
// kernel to send deathSig to it when we die, so servers do not outlive a
// killed test binary.
//
// Go applies Credential before PR_SET_PDEATHSIG in the forked child; that
// order matters because the kernel clears the parent-death signal whenever
// the uid/gid change. Pdeathsig fires when the OS thread that forked the
// child exits; Go only retires threads of goroutines that exit while locked
// with runtime.LockOSThread, so callers must not start servers from such a
// goroutine.
func sysProcAttr(cred *syscall.Credential, deathSig syscall.Signal) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: deathSig, Credential: cred}
}

// dirProcs returns the live (non-zombie) processes whose working directory
// is dir. Every postgres server process chdirs into its data directory, and
// its backends call setsid(), so this (not the process group) is how the
// orphaned backends of a killed postmaster are found. Zombies are skipped:
// orphans are reparented to PID 1, which in a container often never reaps
// them.
func dirProcs(dir string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cwd, err := os.Readlink("/proc/" + e.Name() + "/cwd")
		if err != nil || cwd != dir {
			continue
		}
		if state, _, ok := procStat(e.Name()); ok && state != 'Z' && state != 'X' {
			pids = append(pids, pid)
		}
	}
	return pids
}

// pidAlive reports whether pid exists and is not a zombie.
func pidAlive(pid int) bool {
	state, _, ok := procStat(strconv.Itoa(pid))
	return ok && state != 'Z' && state != 'X'
}

// procStat parses the state and process group out of /proc/<pid>/stat.
func procStat(pid string) (state byte, pgrp int, ok bool) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, 0, false
	}
	// The command name is in parentheses and may contain spaces, so parse
	// from the last ')': " S ppid pgrp ...".
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 3 || len(f[0]) != 1 {
		return 0, 0, false
	}
	pg, err := strconv.Atoi(string(f[2]))
	if err != nil {
		return 0, 0, false
	}
	return f[0][0], pg, true
}
