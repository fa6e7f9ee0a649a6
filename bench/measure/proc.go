package measure

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// ProcCPUTicks returns utime+stime (fields 14 and 15, in clock ticks) from
// the contents of /proc/<pid>/stat. The command name (field 2) may hold
// spaces and parentheses, so fields are counted after its last ')'.
func ProcCPUTicks(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc stat: no ')' after the command name")
	}
	f := strings.Fields(string(stat[i+1:]))
	// After ')': state(3) ppid(4) ... utime(14) stime(15): indexes 11 and 12.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc stat: %d fields after the command name, want at least 13", len(f))
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc stat: utime %q stime %q are not counts", f[11], f[12])
	}
	return u + s, nil
}

// ProcMemory is a process's resident memory from /proc/<pid>/status.
type ProcMemory struct {
	RSSBytes, PeakRSSBytes uint64 // VmRSS, VmHWM
}

// ParseProcStatus reads VmRSS and VmHWM from /proc/<pid>/status.
func ParseProcStatus(status []byte) (ProcMemory, error) {
	var m ProcMemory
	var have int
	s := bufio.NewScanner(bytes.NewReader(status))
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return ProcMemory{}, fmt.Errorf("/proc status %s: %q is not \"<n> kB\"", k, strings.TrimSpace(v))
		}
		n, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil || n > 1<<40 {
			return ProcMemory{}, fmt.Errorf("/proc status %s: %q is not a size", k, f[0])
		}
		if k == "VmRSS" {
			m.RSSBytes = n << 10
		} else {
			m.PeakRSSBytes = n << 10
		}
		have++
	}
	if have < 2 {
		return ProcMemory{}, fmt.Errorf("/proc status: no VmRSS and VmHWM (a kernel thread or a zombie?)")
	}
	return m, nil
}
