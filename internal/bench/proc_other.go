//go:build !linux

package bench

import (
	"errors"
	"time"
)

var errNoProc = errors.New("bench: /proc is Linux-only")

// PeakRSS is unknown off Linux.
func PeakRSS(int) (int64, error) { return 0, errNoProc }

func procCPU(int) (time.Duration, error) { return 0, errNoProc }

func selfCPU() time.Duration { return 0 }
