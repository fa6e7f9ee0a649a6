package mtls

import (
	"fmt"
	"slices"
	"strings"
)

// Headers are the table's columns.
var Headers = []string{"NAMESPACE", "POD", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL", "MODE", "REDIRECTION", "CERT", "LIVE"}

// TableRows renders the rows as table cells.
func TableRows(rep Report) [][]string {
	out := make([][]string, 0, len(rep.Workloads))
	for _, r := range rep.Workloads {
		out = append(out, []string{r.Namespace, r.Pod, r.Address, r.Node, waypointCell(r.Waypoint), r.Protocol,
			modeCell(r), r.Redirection, certCell(r.Cert), liveCell(r.Live)})
	}
	return out
}

func waypointCell(w string) string {
	if w == "" {
		return "None" // as istioctl shows it
	}
	return w
}

func modeCell(r Row) string {
	if !r.Enrolled {
		return ""
	}
	s := r.Mode
	if len(r.PortModes) > 0 {
		var ports []string
		for _, p := range slices.Sorted(mapsKeys(r.PortModes)) {
			ports = append(ports, fmt.Sprintf("%d:%s", p, r.PortModes[p]))
		}
		s += " (ports " + strings.Join(ports, ",") + ")"
	}
	if r.ModeConfigured != "" && r.Mode != r.ModeConfigured {
		s += " (" + r.ModeConfigured + " configured)"
	}
	return s
}

func mapsKeys(m map[uint32]string) func(func(uint32) bool) {
	return func(yield func(uint32) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// shortID turns spiffe://td/ns/X/sa/Y into X/Y.
func shortID(id string) string {
	rest, ok := strings.CutPrefix(id, "spiffe://")
	if !ok {
		return id
	}
	parts := strings.Split(rest, "/")
	if len(parts) == 5 && parts[1] == "ns" && parts[3] == "sa" {
		return parts[2] + "/" + parts[4]
	}
	return id
}

func certCell(c Cert) string {
	until := ""
	if c.NotAfter != nil {
		until = " until " + c.NotAfter.UTC().Format("2006-01-02 15:04Z")
	}
	switch c.State {
	case CertNone:
		return ""
	case CertValid:
		return shortID(c.Identity) + until
	case CertExpiring:
		return "EXPIRING " + shortID(c.Identity) + until
	case CertExpired:
		return "EXPIRED " + shortID(c.Identity) + until
	case CertMissing:
		return "MISSING"
	case CertUnknown:
		return "?"
	}
	return c.State
}

func liveCell(l Live) string {
	switch {
	case l.MTLS == 0 && l.Plaintext == 0:
		return ""
	case l.Plaintext == 0:
		return fmt.Sprintf("%d mTLS", l.MTLS)
	case l.MTLS == 0:
		return fmt.Sprintf("%d PLAINTEXT", l.Plaintext)
	}
	return fmt.Sprintf("%d mTLS, %d PLAINTEXT", l.MTLS, l.Plaintext)
}

// SummaryText is the verdict line, then the problems and notes, for the
// end of the table.
func SummaryText(s Summary) string {
	var b strings.Builder
	b.WriteString(s.Line + "\n")
	if len(s.Problems) > 1 {
		for _, p := range s.Problems {
			b.WriteString("  problem: " + p + "\n")
		}
	}
	for _, n := range s.Notes {
		b.WriteString("  note: " + n + "\n")
	}
	return b.String()
}
